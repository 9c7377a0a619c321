"""Split fine-tuning: LoRA adapters trained on both sides of the cut, federated rounds, and planning how UEs and
edge servers share the work and the radio (FedsLLM, DASHF)."""
