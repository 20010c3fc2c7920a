"""Content addressing: manifests of folders (:mod:`.manifest`) and packs of objects (:mod:`.pack`)."""
