"""The bilevel pieces: the reweighting head and its outer objective (:mod:`.reweighting`), the implicit
hypergradient over the LM head (:mod:`.hypergradient`) or over every trained parameter
(:mod:`.hypergradient_trainable`), and the inner step's first-order response (:mod:`.step_response`)."""
