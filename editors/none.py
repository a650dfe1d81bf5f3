"""The reference row: an editor that changes nothing.

Its scores are the unedited model's under the exact protocol every editor runs under,
so its locality is 1.0 by construction and its reliability is the base rate.
"""
from __future__ import annotations

from editbench.registry import register
from editbench.editor import Editor


@register("none")
class NoEdit(Editor):
    def edit(self, request):
        return None

    def edit_batch(self, requests):
        return None

    supports_batch = True
