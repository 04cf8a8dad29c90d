"""Models beside the neighbours: a gradient-boosted tree model trained on the references
(``train``), a registry of immutable versions with one promoted to production (``registry``),
a native evaluator of LightGBM's trees with per-feature reasons (``trees``, ``_trees.c``), and
the scorer that puts a version behind the scoring seam (``scorer.ModelScorer``)."""
