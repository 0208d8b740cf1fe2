"""Evaluating policies live: shadow and closed-loop comparisons, held-out seeds, paired statistics."""
