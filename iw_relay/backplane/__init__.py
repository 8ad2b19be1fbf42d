"""How relay nodes share rooms: `local` (one node, the default), `redis` (many nodes through
one Redis) and `memory` (many nodes in one process, for tests). See `base` for the interfaces
and the wire format."""
