"""A HeldSyn as the SYN queue hands it over, without binding a real queue."""
from dataclasses import dataclass


@dataclass(frozen=True)
class HeldSynStub:
    family: int
    src: str
    sport: int
    dst: str
    dport: int
    ts: float = 0.0
    hook: int = 3
    ifindex: int = 0
