"""Adapters of pop-fx to serving engines; each imports its engine only when used (``pop_fx.integrations.vllm``)."""
