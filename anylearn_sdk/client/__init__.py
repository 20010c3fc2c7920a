"""HTTP plumbing: the shared session (:mod:`.http`) and the tus upload client (:mod:`.tus`)."""
