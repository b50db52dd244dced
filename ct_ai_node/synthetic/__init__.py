"""Synthetic chest-CT phantoms (covid-like, community-acquired pneumonia, normal)
with ground-truth lung and lesion masks, and a DICOM series writer.

    from ct_ai_node.synthetic import generate_phantom, write_dicom_series, write_case
"""

from .phantom import GENERATOR_VERSION, KINDS, Phantom, generate_phantom, phantom_volume

__all__ = ["GENERATOR_VERSION", "KINDS", "Phantom", "generate_phantom", "phantom_volume", "write_dicom_series",
           "write_case", "copy_as_new_study"]


def __getattr__(name):  # the DICOM writer imports pydicom lazily
    if name in ("write_dicom_series", "write_case", "copy_as_new_study"):
        from . import dicom_series

        return getattr(dicom_series, name)
    raise AttributeError(name)
