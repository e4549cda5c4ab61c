"""Interconnects a disaggregated system ships KV caches over, and what one transfer costs.

Bandwidths are nominal peaks *per direction* (a KV transfer goes one way), from the vendors'
datasheets and the standards; real transfers reach less, so the simulated DistServe pays at
least these times, never more (the comparison favours it). A transfer of `b` bytes takes
`latency_s + b / bandwidth`.

| link        | GB/s per direction | source                                                        |
|-------------|-------------------:|---------------------------------------------------------------|
| nvlink-a100 |  300 | NVIDIA A100 datasheet: NVLink 3, 600 GB/s bidirectional per GPU  |
| nvlink-h100 |  450 | NVIDIA H100 SXM datasheet: NVLink 4, 900 GB/s bidirectional      |
| pcie-gen4   |   32 | PCI-SIG PCIe 4.0: 16 GT/s x 16 lanes, 128b/130b (~31.5 GB/s)     |
| pcie-gen5   |   64 | PCI-SIG PCIe 5.0: 32 GT/s x 16 lanes, 128b/130b (~63 GB/s)       |
| net-100g    | 12.5 | 100 Gb/s NIC (100GbE / InfiniBand HDR100): 100e9 / 8 bytes/s     |
| net-200g    |   25 | 200 Gb/s NIC (InfiniBand HDR / 200GbE)                           |
| net-400g    |   50 | 400 Gb/s NIC (InfiniBand NDR / 400GbE)                           |

Per-transfer latency: 10 us on NVLink and PCIe (a DMA launch), 20 us over the network (an RDMA
round trip); both are negligible next to the bytes for any real prompt (Llama-2-7B holds
0.5 MiB of KV per token: 1000 tokens = 524 MB, 1.7 ms on NVLink, 42 ms on 100 Gb/s).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Link:
    name: str
    gb_per_s: float  # 1e9 bytes per second, one direction
    latency_s: float
    source: str

    def transfer_s(self, num_bytes: float) -> float:
        """Seconds to move `num_bytes` over this link (0 bytes: nothing moves)."""
        if num_bytes <= 0:
            return 0.0
        return self.latency_s + num_bytes / (self.gb_per_s * GB)


LINKS: dict[str, Link] = {
    link.name: link
    for link in (
        Link("nvlink-a100", 300.0, 10e-6, "NVIDIA A100 datasheet: NVLink 600 GB/s bidirectional"),
        Link("nvlink-h100", 450.0, 10e-6, "NVIDIA H100 datasheet: NVLink 900 GB/s bidirectional"),
        Link("pcie-gen4", 32.0, 10e-6, "PCIe 4.0 x16: 16 GT/s x 16 lanes, 128b/130b"),
        Link("pcie-gen5", 64.0, 10e-6, "PCIe 5.0 x16: 32 GT/s x 16 lanes, 128b/130b"),
        Link("net-100g", 12.5, 20e-6, "100 Gb/s NIC (100GbE / InfiniBand HDR100)"),
        Link("net-200g", 25.0, 20e-6, "200 Gb/s NIC (InfiniBand HDR / 200GbE)"),
        Link("net-400g", 50.0, 20e-6, "400 Gb/s NIC (InfiniBand NDR / 400GbE)"),
    )
}
ALIASES = {"nvlink": "nvlink-a100", "pcie": "pcie-gen4", "100g": "net-100g", "200g": "net-200g"}


def get_link(name: str) -> Link:
    key = ALIASES.get(name, name)
    if key not in LINKS:
        raise ValueError(f"unknown link {name!r}; known: {', '.join(LINKS)}")
    return LINKS[key]


def kv_transfer_s(prompt_tokens: int, kv_bytes_per_token: int, link: Link) -> float:
    """Time to ship a prompt's KV cache (every layer's K and V for every token) over `link`."""
    return link.transfer_s(prompt_tokens * kv_bytes_per_token)


__all__ = ["LINKS", "Link", "get_link", "kv_transfer_s"]
