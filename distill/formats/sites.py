"""Site names of the multi-site prostate T2 MRI release (folder names, per-site metrics, case lists)."""

#: The six sites, in their usual order.
PROSTATE_SITES: tuple[str, ...] = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")
#: Other names some copies use for a site's folder.
SITE_ALIASES: dict[str, str] = {"ISBI": "RUNMC", "ISBI_1.5": "BMC"}
