"""Framework integrations: Megatron-LM (megatron.py) and TransformerEngine (transformer_engine.py)."""
