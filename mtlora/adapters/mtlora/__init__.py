"""mtLoRA (``docs/methods.md`` §6): component layer and routing pieces (:mod:`.layer`), block-level adapters
and placement (:mod:`.block`), the spectral-aware penalty on the expert up-matrices
(:mod:`.spectral_penalty`). Its spec: :mod:`mtlora.adapters.methods.mtlora`."""
