"""Site names of the multi-site prostate T2 MRI release (folder names, per-site metrics, case lists)
and the one lookup that turns a written site name into its canonical spelling."""

from __future__ import annotations

from collections.abc import Sequence

from distill.errors import DataError

#: The six sites, in their usual order.
PROSTATE_SITES: tuple[str, ...] = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")
#: Other names some copies use for a site's folder.
SITE_ALIASES: dict[str, str] = {"ISBI": "RUNMC", "ISBI_1.5": "BMC"}
#: The end of a message about a site name no lookup knows.
KNOWN_SITES_HINT = (
    f"known sites: {', '.join(PROSTATE_SITES)} "
    f"(aliases: {', '.join(f'{alias} = {site}' for alias, site in SITE_ALIASES.items())})"
)
_RELEASE_SITE_BY_UPPER_NAME = {site.upper(): site for site in PROSTATE_SITES} | {
    alias.upper(): site for alias, site in SITE_ALIASES.items()
}


def canonical_site(name: str, key: str | None = None, available: Sequence[str] = ()) -> str:
    """The canonical spelling of site ``name``.

    A release site under any case or alias is that site ("isbi" -> "RUNMC"); another name is the
    one of ``available`` (sites of the data read) it matches case-insensitively. A name that is
    neither is returned as written when ``key`` is None, and refused (DataError naming the option
    ``key``) otherwise.
    """
    upper = str(name).upper()
    site = _RELEASE_SITE_BY_UPPER_NAME.get(upper) or next((s for s in available if s.upper() == upper), None)
    if site is not None:
        return site
    if key is None:
        return name
    read = f"; sites read: {', '.join(available)}" if available else ""
    raise DataError(f"{key}: unknown site {name!r}; {KNOWN_SITES_HINT}{read}")


def site_order(site: str) -> tuple[int, str]:
    """Sort key of a site: the release's sites in their usual order, then other names alphabetically."""
    return (PROSTATE_SITES.index(site), "") if site in PROSTATE_SITES else (len(PROSTATE_SITES), site)
