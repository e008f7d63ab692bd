"""tierkv's vLLM integration (vLLM 0.32/0.33).

``pages``: vLLM's paged KV-cache tensors, whatever their physical layout, read and written as tierkv blocks.
The KV connector that vLLM loads is still to come; nothing here imports vllm at import time.
"""
