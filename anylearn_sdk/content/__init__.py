"""Content addressing: folder manifests (:mod:`.manifest`), packs of objects (:mod:`.pack`)."""
