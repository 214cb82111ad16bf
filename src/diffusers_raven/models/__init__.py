from .attention import CausalWanAttnProcessor
from .kv_cache import KVCache, KVCacheSnapshot
from .transformer_causal_wan import CausalWanTransformer3DModel

__all__ = ["CausalWanAttnProcessor", "CausalWanTransformer3DModel", "KVCache", "KVCacheSnapshot"]
