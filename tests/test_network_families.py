"""Network families are listed in one module, with no registration by import side effect."""

import lightning as L

import distill.modules
from distill.modules.families import NETWORK_FAMILIES


def test_every_module_family_is_listed():
    families = {
        cls.network_family
        for cls in vars(distill.modules).values()
        if isinstance(cls, type) and issubclass(cls, L.LightningModule) and cls.network_family
    }
    assert families == set(NETWORK_FAMILIES) == {"segmentation", "moco", "phase_classifier"}
