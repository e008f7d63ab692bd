"""vLLM internals the tests use to build KV caches exactly as vLLM does, wherever the installed version keeps
them (the connector itself only uses vLLM's public connector API)."""
try:  # vLLM >= 0.33
    from vllm.v1.core.kv_cache_planning import create_kv_cache_group_specs, get_kv_cache_config_from_groups
except ImportError:  # vLLM 0.32
    from vllm.v1.core.kv_cache_utils import create_kv_cache_group_specs, get_kv_cache_config_from_groups

__all__ = ["create_kv_cache_group_specs", "get_kv_cache_config_from_groups"]
