"""The shipped drafts' weights change only at a recorded release (docs/releasing-drafts.md)."""

from __future__ import annotations

import hashlib
import json

from wisp_common.models import PACKAGED_DRAFTS

RELEASES = PACKAGED_DRAFTS / "releases.json"


def sha256(draft) -> str:
    """One digest over every weights file of a draft (its layers, then its embedding's shards), in name order."""
    digest = hashlib.sha256()
    for path in sorted(draft.glob("*.safetensors"), key=lambda p: (p.name != "model.safetensors", p.name)):
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def test_every_shipped_draft_is_its_latest_recorded_release():
    releases = json.loads(RELEASES.read_text())
    shipped = sorted(p.parent.name for p in PACKAGED_DRAFTS.glob("*/model.safetensors"))
    assert shipped and shipped == sorted(releases), f"record each shipped draft's release in {RELEASES}"
    for name in shipped:
        latest = releases[name][-1]
        assert {"release", "date", "sha256", "reason", "measured", "command"} <= set(latest)
        assert sha256(PACKAGED_DRAFTS / name) == latest["sha256"], (
            f"{name}'s weights changed without a release: either restore them, or record the release (reason, "
            f"measured gain and command) in {RELEASES} in a commit of its own"
        )
