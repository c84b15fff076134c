"""Selection: variants S / A / P, the evidence for each chosen feature, and why a selection is empty."""

from corrsteer_pl.selection.variants import SelectedFeature, Selection, select_features

__all__ = ["SelectedFeature", "Selection", "select_features"]
