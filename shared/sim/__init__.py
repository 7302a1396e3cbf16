"""nanokimi.sim: a policy-free discrete-event simulator of a KVCache-centric serving cluster (chapter 07 adds the policies)."""
