"""The bilevel pieces: the reweighting head and its outer objective (:mod:`.reweighting`), the implicit
hypergradient over the LM head (:mod:`.hypergradient`) or over every trained parameter
(:mod:`.hypergradient_trainable`), the inner step's first-order response (:mod:`.step_response`), the
outer step that puts them together (:mod:`.outer`), and the outer objectives (:mod:`.objectives`)."""
