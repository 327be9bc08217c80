"""Training losses: the causal-LM answer-token loss (:mod:`.causal_lm`) and the Align-LoRA
representation-alignment losses (:mod:`.alignment`)."""
