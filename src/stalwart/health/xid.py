"""NVIDIA Xid codes -> what stalwart recommends, from NVIDIA's Xid catalog resolution buckets.

RESTART_APP -> ``restart`` (restarting the process on the same GPU is enough); IGNORE ->
``ignore``/``warn`` (informational); RESET_GPU and RESTART_BM -> ``replace_node`` (a container
cannot reset a GPU: the node must be rebooted or replaced). The WORKFLOW_* buckets ask for a
decode of registers that NVML's Xid event does not carry: 48, 74 and the NVLink5 errors get
the action of their worst documented outcome (a reset); 45 is ignored, since stopping workers
raises it. Xid 154 means "read the driver's recovery action",
which ``RECOVERY_ACTIONS`` maps. Unknown Xids warn. ``--xid-action`` overrides.
"""

from __future__ import annotations

from stalwart.health.api import Action

__all__ = ["RECOVERY_ACTIONS", "XIDS", "XID_RECOVERY_ACTION_CHANGED", "xid_action"]

R, W, IG, N = Action.RESTART, Action.WARN, Action.IGNORE, Action.REPLACE_NODE

# xid -> (short description, action, NVIDIA immediate resolution bucket)
XIDS: dict[int, tuple[str, Action, str]] = {
    13: ("graphics engine exception", R, "RESTART_APP"),
    31: ("GPU memory page fault", R, "RESTART_APP"),
    43: ("GPU stopped processing (reset channel)", IG, "IGNORE"),
    45: ("preemptive cleanup after earlier errors", IG, "WORKFLOW_XID_45"),
    46: ("GPU stopped processing (timeout)", N, "RESET_GPU"),
    48: ("double-bit ECC error", N, "WORKFLOW_XID_48"),
    # pre-Ampere only (unused since); NVIDIA's debug guide resets the GPU
    61: ("internal micro-controller breakpoint/warning", N, "RESET_GPU"),
    62: ("internal micro-controller halt", N, "RESET_GPU"),
    63: ("memory row-remapping event", W, "IGNORE"),
    64: ("row-remapping failure", N, "RESET_GPU"),
    68: ("NVDEC0 exception", R, "RESTART_APP"),
    69: ("graphics engine class error", R, "RESTART_APP"),
    # the catalog: "a GPU reset or node reboot is needed to clear this error"
    74: ("NVLink error (link down until a GPU reset)", N, "WORKFLOW_NVLINK_ERR"),
    79: ("GPU has fallen off the bus", N, "RESTART_BM"),
    92: ("high single-bit ECC error rate", W, "IGNORE"),
    94: ("contained memory error", R, "RESTART_APP"),
    95: ("uncontained memory error", N, "RESET_GPU"),
    109: ("context-switch timeout", N, "RESET_GPU"),
    119: ("GSP RPC timeout", N, "RESET_GPU"),
    120: ("GSP error", N, "RESET_GPU"),
    121: ("C2C link corrected error (Grace-GPU)", W, "IGNORE"),
    136: ("NVLink training failed", N, "RESET_GPU"),
    140: ("unrecovered ECC error escape", N, "RESET_GPU"),
    143: ("GPU initialization error", N, "RESET_GPU"),
    # NVML gives the number alone, not the registers the catalog decodes these with; the fatal
    # ones also set the driver's recovery action, which Xid 154 reports. 147/148 are informational.
    **{x: ("NVLink5 error", N, "WORKFLOW_NVLINK5_ERR") for x in (144, 145, 146, 149, 150)},
    **{x: ("NVLink5 error (informational)", W, "IGNORE") for x in (147, 148)},
    154: ("GPU recovery action changed", W, "XID_154"),
    155: ("NVLink brought down on purpose (SW-defined), down until a GPU reset", N, "RESET_GPU"),
    156: ("resource retirement event (a GPU reset applies it)", N, "RESET_GPU"),
    157: ("resource retirement failure (no spare resources left)", W, "IGNORE"),
    158: ("GPU fatal timeout", N, "RESET_GPU"),
}
XID_RECOVERY_ACTION_CHANGED = 154

# NVML_FI_DEV_GET_GPU_RECOVERY_ACTION value -> (name, action)
RECOVERY_ACTIONS: dict[int, tuple[str, Action]] = {
    0: ("none", IG),
    1: ("gpu_reset", N),
    2: ("node_reboot", N),
    3: ("drain_p2p", R),
    4: ("drain_and_reset", N),
    5: ("recover_imex_domain", N),
    6: ("bus_reset", N),
    7: ("system_reboot", N),
}


def xid_action(xid: int, overrides: dict[int, Action] | None = None) -> tuple[str, Action, str]:
    """Description, action and NVIDIA bucket for ``xid`` (``overrides`` win)."""
    desc, action, bucket = XIDS.get(xid, (f"Xid {xid} (not in stalwart's table)", W, "UNKNOWN"))
    if overrides and xid in overrides:
        action = overrides[xid]
    return desc, action, bucket
