"""One torch-free spec module per adapter method family; each registers its methods at import.

:func:`mtlora.adapters.registry.discover` imports every module here. A new method: a module here with its
:class:`~mtlora.adapters.spec.MethodSpec` (knobs, capabilities, the layer as ``"module:Class"``), the layer
module, and ``conf/adapter/<name>.yaml``.
"""
