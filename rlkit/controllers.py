"""Controllers that are not tied to one method live here; method-specific ones
(D³S schedule, UEC entropy band, length budget) live with their method in
``rlkit.algorithms``."""
