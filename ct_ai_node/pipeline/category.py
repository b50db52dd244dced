"""A suggested reporting category: CO-RADS (Prokop et al., Radiology 2020) and the RSNA
consensus categories (Simpson et al., Radiology: Cardiothoracic Imaging 2020).

Always an AI suggestion for the radiologist, with the features that led to it. It reads
what the node measures: the three-class result (``pipeline.pattern``), the opacities'
pattern features (distribution and composition), and, when lobes are segmented, how the
opacity spreads over them. The mapping (docs/reporting.md has it with its sources):

* **negative / CO-RADS 1**: no opacity worth a name (below :data:`MIN_OPACITY_PERCENT` of the
  lungs and :data:`MIN_OPACITY_ML`).
* **typical / CO-RADS 5**: ground glass predominant, bilateral, peripheral predominant and
  multifocal (the RSNA "typical" pattern: peripheral, bilateral ground glass with or without
  consolidation, multifocal), with the three-class result COVID-19-like.
* **typical / CO-RADS 4**: the typical pattern while the three-class result is not
  COVID-19-like, or the result COVID-19-like with the pattern short of one typical feature
  (CO-RADS 4: "similar to 5 but ... unilateral, ... without contact with the pleura").
* **atypical / CO-RADS 2**: consolidation predominant and concentrated (one focus or one
  lobe holding most of it) and one-sided: the lobar or segmental consolidation of a
  bacterial pneumonia; or the three-class result "other pneumonia" with no typical feature.
* **indeterminate / CO-RADS 3**: everything else (opacity without the typical distribution,
  e.g. unifocal, central or one-sided ground glass).

What the node cannot see yet, and so never uses: nodules (centrilobular, tree-in-bud),
cavitation, pleural effusion, smooth septal thickening, the reversed halo sign.

Pure logic: numbers in, a suggestion out.
"""

from __future__ import annotations

import math

from ct_ai_node.pipeline.types import LOBE_TEXT, CategorySuggestion, LobeInvolvement

#: below both, the opacity is not a finding: negative
MIN_OPACITY_PERCENT = 0.1
MIN_OPACITY_ML = 1.0
#: share of the opacity in the smaller lung from which it counts as bilateral (0.5: symmetric)
BILATERAL_SHARE = 0.15
#: share of the opacity in the outer third of the lung from which it is peripheral predominant
PERIPHERAL_SHARE = 0.5
#: separate opacities of at least 0.5 ml from which it is multifocal
MULTIFOCAL_FOCI = 2
#: share of the opacity at or above -300 HU from which it is consolidation predominant
CONSOLIDATION_SHARE = 0.5
#: share of the opacity in its largest focus, or in one lobe, from which it is concentrated
CONCENTRATED_SHARE = 0.7
#: share of the opacity in the lower or posterior half from which that predominance is named
PREDOMINANCE_SHARE = 0.6


def suggest_category(case_class: str | None, class_probabilities: dict[str, float], features: dict[str, float],
                     lesion_ml: float, involvement_percent: float,
                     lobes: list[LobeInvolvement] | None = None) -> CategorySuggestion:
    """CO-RADS and RSNA category suggestion (see the module's mapping).

    ``features``: ``pattern.pattern_features`` of the scan; ``case_class`` and
    ``class_probabilities``: its three-class result (None / empty without one: the pattern
    alone decides, and CO-RADS 5 is never suggested)."""
    if lesion_ml < MIN_OPACITY_ML and involvement_percent < MIN_OPACITY_PERCENT:
        return CategorySuggestion(1, "negative", (f"no relevant opacity ({lesion_ml:.1f} ml)",))

    foci = int(round(math.expm1(features.get("foci", 0.0))))
    bilateral = features.get("bilateral", 0.0) >= BILATERAL_SHARE
    peripheral = features.get("peripheral", 0.0) >= PERIPHERAL_SHARE
    multifocal = foci >= MULTIFOCAL_FOCI
    consolidation = features.get("consolidation", 0.0)
    ggo_predominant = consolidation < CONSOLIDATION_SHARE
    top_lobe = max(lobes, key=lambda lobe: lobe.ggo_ml + lobe.consolidation_ml) if lobes else None
    lobe_share = 0.0
    if top_lobe is not None:
        total = sum(lobe.ggo_ml + lobe.consolidation_ml for lobe in lobes)
        lobe_share = (top_lobe.ggo_ml + top_lobe.consolidation_ml) / total if total > 0 else 0.0
    concentrated = features.get("largest", 0.0) >= CONCENTRATED_SHARE or lobe_share >= CONCENTRATED_SHARE

    said: list[str] = []
    said.append("bilateral" if bilateral else "one-sided")
    said.append("peripheral predominant" if peripheral else "not peripheral predominant")
    said.append(f"multifocal ({foci} foci)" if multifocal else "unifocal")
    said.append(f"ground glass predominant ({100 * (1 - consolidation):.0f} %)" if ggo_predominant
                else f"consolidation predominant ({100 * consolidation:.0f} %)")
    if features.get("lower", 0.0) >= PREDOMINANCE_SHARE:
        said.append("lower zones predominant")
    if features.get("posterior", 0.0) >= PREDOMINANCE_SHARE:
        said.append("posterior predominant")
    if top_lobe is not None and lobe_share >= CONCENTRATED_SHARE:
        said.append(f"{100 * lobe_share:.0f} % of it in the {LOBE_TEXT[top_lobe.name].lower()}")

    typical_flags = (bilateral, peripheral, multifocal, ggo_predominant)
    covid_like = case_class == "covid_like"
    p_covid = class_probabilities.get("covid_like")
    if p_covid is not None:
        said.append(f"three-class result {case_class} (P COVID-19-like {p_covid:.2f})")

    if all(typical_flags):
        return CategorySuggestion(5 if covid_like else 4, "typical", tuple(said))
    lobar = not ggo_predominant and concentrated and not bilateral
    if lobar or (case_class == "other_pneumonia" and not any(typical_flags[:3])):
        return CategorySuggestion(2, "atypical", tuple(said))
    if covid_like and sum(typical_flags) == len(typical_flags) - 1:
        return CategorySuggestion(4, "indeterminate", tuple(said))
    return CategorySuggestion(3, "indeterminate", tuple(said))


__all__ = ["suggest_category"]
