"""nanokimi.muon: Muon, Moonlight's scaling and MuonClip (QK-clip). Public API re-exported here as the chapter lands."""
