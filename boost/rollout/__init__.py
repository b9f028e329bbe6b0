"""Rolling a model out in the environments: batched generation of episodes (:mod:`.generation`), the
shared-prefix KV cache it uses (:mod:`.prefix_cache`), and the held-out evaluation CLI
(:mod:`.evaluate`, ``python -m boost.rollout.evaluate``)."""
