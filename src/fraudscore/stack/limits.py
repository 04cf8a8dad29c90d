"""CPU and memory for each service of the stack: the one place these numbers are written.

The compose file (``compose.py``) and the local runner's cgroups (``cgroups.py``) both read them,
so what is tested locally is what is deployed.

>>> DEFAULT_STACK.total_cpus, DEFAULT_STACK.total_memory_mib
(1.0, 350)
>>> [(s.name, s.cpus, s.memory_mib) for s in DEFAULT_STACK.services]
[('lb', 0.1, 20), ('api1', 0.45, 165), ('api2', 0.45, 165)]
"""

from __future__ import annotations

from dataclasses import dataclass

from fraudscore.errors import LimitsError

# The contract's ceiling for the whole stack (load balancer plus every API instance).
CONTRACT_CPUS = 1.0
CONTRACT_MEMORY_MIB = 350

# CPUs are handled in thousandths (Docker's "millicpus") so sums and splits are exact.
_MILLI = 1000
MIB = 1 << 20


def _millicpus(cpus: float) -> int:
    return round(cpus * _MILLI)


@dataclass(frozen=True)
class ServiceLimits:
    """One service's share: a CPU quota (in CPUs, e.g. 0.45) and a memory ceiling in MiB.

    >>> api = ServiceLimits("api1", 0.45, 165)
    >>> api.compose_cpus, api.compose_memory, api.memory_bytes
    ('0.45', '165MB', 173015040)
    """

    name: str
    cpus: float
    memory_mib: int

    def __post_init__(self) -> None:
        if not self.name:
            raise LimitsError("a service needs a name")
        if _millicpus(self.cpus) <= 0:
            raise LimitsError(f"{self.name}: cpus must be at least 0.001, got {self.cpus!r}")
        if self.memory_mib <= 0:
            raise LimitsError(
                f"{self.name}: memory must be a positive number of MiB, got {self.memory_mib!r}"
            )

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @property
    def compose_cpus(self) -> str:
        """``cpus`` as compose writes it: at least two decimals, no float noise ("0.10", "0.225")."""
        text = f"{_millicpus(self.cpus) / _MILLI:.3f}"
        return text[:-1] if text.endswith("0") else text

    @property
    def compose_memory(self) -> str:
        # Docker reads "MB" as 2**20 bytes (its RAM units are binary), so this is exactly memory_mib.
        return f"{self.memory_mib}MB"


@dataclass(frozen=True)
class StackLimits:
    """The load balancer and the API instances it spreads requests over."""

    balancer: ServiceLimits
    apis: tuple[ServiceLimits, ...]

    @property
    def services(self) -> tuple[ServiceLimits, ...]:
        return (self.balancer, *self.apis)

    @property
    def total_cpus(self) -> float:
        return sum(_millicpus(s.cpus) for s in self.services) / _MILLI

    @property
    def total_memory_mib(self) -> int:
        return sum(s.memory_mib for s in self.services)


DEFAULT_BALANCER = ServiceLimits("lb", 0.10, 20)
DEFAULT_STACK = StackLimits(
    balancer=DEFAULT_BALANCER,
    apis=(ServiceLimits("api1", 0.45, 165), ServiceLimits("api2", 0.45, 165)),
)


def scaled(
    n_apis: int,
    *,
    balancer: ServiceLimits = DEFAULT_BALANCER,
    total_cpus: float = CONTRACT_CPUS,
    total_memory_mib: int = CONTRACT_MEMORY_MIB,
) -> StackLimits:
    """The balancer keeps its share; ``n_apis`` instances split what it leaves evenly.

    Shares are rounded down (to 0.001 CPU and 1 MiB), so the sum never exceeds the totals.

    >>> scaled(2) == DEFAULT_STACK
    True
    >>> [(s.name, s.compose_cpus, s.memory_mib) for s in scaled(4).apis]
    [('api1', '0.225', 82), ('api2', '0.225', 82), ('api3', '0.225', 82), ('api4', '0.225', 82)]
    >>> scaled(0)
    Traceback (most recent call last):
    ...
    fraudscore.errors.LimitsError: the stack needs at least one API instance, got 0
    """
    if n_apis < 1:
        raise LimitsError(f"the stack needs at least one API instance, got {n_apis}")
    free_milli = _millicpus(total_cpus) - _millicpus(balancer.cpus)
    free_mib = total_memory_mib - balancer.memory_mib
    if free_milli < n_apis or free_mib < n_apis:
        raise LimitsError(
            f"after the balancer ({balancer.cpus} CPU, {balancer.memory_mib} MiB) there is "
            f"{free_milli / _MILLI} CPU and {free_mib} MiB left: too little for {n_apis} API instance(s)"
        )
    cpus, mib = (free_milli // n_apis) / _MILLI, free_mib // n_apis
    apis = tuple(ServiceLimits(f"api{i}", cpus, mib) for i in range(1, n_apis + 1))
    return check(StackLimits(balancer, apis), max_cpus=total_cpus, max_memory_mib=total_memory_mib)


def check(
    stack: StackLimits,
    *,
    max_cpus: float = CONTRACT_CPUS,
    max_memory_mib: int = CONTRACT_MEMORY_MIB,
) -> StackLimits:
    """Return ``stack`` if its totals fit the ceiling (by default the contract's), else raise LimitsError.

    >>> check(DEFAULT_STACK) is DEFAULT_STACK
    True
    >>> check(StackLimits(DEFAULT_BALANCER, (ServiceLimits("api1", 0.95, 300),)))
    Traceback (most recent call last):
    ...
    fraudscore.errors.LimitsError: the stack asks for 1.05 CPU and 320 MiB (lb 0.1 CPU/20 MiB, \
api1 0.95 CPU/300 MiB), over the ceiling of 1.0 CPU and 350 MiB: CPU is 0.05 over
    """
    names = [s.name for s in stack.services]
    if len(set(names)) != len(names):
        raise LimitsError(f"service names must be unique, got {names}")
    over = []
    cpu_excess = (_millicpus(stack.total_cpus) - _millicpus(max_cpus)) / _MILLI
    if cpu_excess > 0:
        over.append(f"CPU is {cpu_excess} over")
    if stack.total_memory_mib > max_memory_mib:
        over.append(f"memory is {stack.total_memory_mib - max_memory_mib} MiB over")
    if over:
        shares = ", ".join(f"{s.name} {s.cpus} CPU/{s.memory_mib} MiB" for s in stack.services)
        raise LimitsError(
            f"the stack asks for {stack.total_cpus} CPU and {stack.total_memory_mib} MiB ({shares}), "
            f"over the ceiling of {max_cpus} CPU and {max_memory_mib} MiB: {'; '.join(over)}"
        )
    return stack
