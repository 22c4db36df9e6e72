from sheepop.model.transformer import ModelArgs, Transformer, KVCache, num_params, flops_per_token

__all__ = ["ModelArgs", "Transformer", "KVCache", "num_params", "flops_per_token"]
