/* Ambit redirect maps: the contract between bpf/redirect.bpf.c and agent/redirect_maps.py.
 *
 * Every map is pinned under AMBIT_PIN_DIR (/sys/fs/bpf/ambit/<instance>), so an agent that restarts compiles a
 * new program against the *same* map objects the already-attached filters use, and can swap the filters without
 * a gap in capture. Changing any struct below changes AMBIT_LAYOUT_VERSION and the Python mirrors; the loader
 * refuses to adopt pins whose sizes differ instead of silently reinterpreting them.
 */
#ifndef AMBIT_MAPS_H
#define AMBIT_MAPS_H

#ifndef AMBIT_PIN_DIR
#error "AMBIT_PIN_DIR must be defined by the loader, e.g. -DAMBIT_PIN_DIR=\"/sys/fs/bpf/ambit/node1\""
#endif

/* 2: ambit_wl_home and ambit_if_spoofed added (source anti-spoofing), ambit_stats grew AMBIT_STAT_DROP_SPOOFED.
 * 3: ambit_bridge_ports added (capture on the ports of bridge CNIs).
 * 4: ambit_agent_conns added (the agent's own connections from inside a pod), ambit_stats grew
 *    AMBIT_STAT_PASS_AGENT.
 * An older pin directory is migrated in place by the agent (agent/redirect_maps.py: new maps created, the
 * counters-only stats map replaced); pins of a newer layout are refused. */
#define AMBIT_LAYOUT_VERSION 4

#define AMBIT_AF_INET 2
#define AMBIT_AF_INET6 10

/* A workload address: family + 16 bytes. IPv4 uses addr[0..3] (network order) and zeroes the rest. */
struct ambit_addr {
    u8 family;
    u8 pad[3];
    u8 addr[16];
};

/* Per-CPU counters of one enrolled workload; the agent sums the CPUs and exports them as metrics. Membership in
 * ambit_workloads is what "enrolled" means to the program, so enrollment and counters cost one lookup. */
struct ambit_wl_counters {
    u64 packets;     /* TCP packets the workload sent, seen at its node-side interface */
    u64 bytes;       /* their bytes (skb->len) */
    u64 conns_out;   /* new outbound connections captured to the outbound listener */
    u64 conns_in;    /* new inbound connections captured to the inbound / HBONE listener */
    u64 drops;       /* connections dropped because no agent listener was there (fail closed) */
};

/* Interface roles (value of ambit_ifaces). */
#define AMBIT_IF_POD 0x1     /* node-side end of pod interfaces: capture from / to enrolled workloads */
#define AMBIT_IF_UPLINK 0x2  /* the node's uplink: capture traffic arriving for enrolled workloads */
/* Modifiers for bridge CNIs (flannel's cni0, the bridge plugin), where pods' node-side veths are ports of one bridge
 * and the route to every pod points at the bridge. A frame between two pods of that bridge is switched at L2 and
 * never reaches the bridge's own ingress, so the ports carry the program too (AMBIT_IF_BRIDGE_PORT, with the pod or
 * uplink role of what is behind them). What a port captures gets the bridge's MAC as destination, so the bridge
 * passes it up to the node's stack instead of switching it; the bridge's program assigns it to its socket. */
#define AMBIT_IF_BRIDGE 0x4      /* a bridge whose ports carry the program: it assigns the packets they marked */
#define AMBIT_IF_BRIDGE_PORT 0x8 /* a port of such a bridge; ambit_bridge_ports names the bridge */

/* Loader bookkeeping kept next to the role so that it survives agent restarts. */
#define AMBIT_LOADER_OWNS_QDISC 0x1 /* the agent created the clsact qdisc and may remove it when it is empty */

struct ambit_iface {
    u32 flags;
    u32 loader_flags;
};

/* Value of ambit_bridge_ports (key: the port's ifindex). */
struct ambit_bridge_port {
    u32 bridge; /* ifindex of the bridge (the home of a pod behind it the agent found no port for) */
    u8 mac[6];  /* the bridge's own address: a frame sent to it is passed up, not switched to another port */
    u8 pad[2];
};

struct ambit_config {
    u16 outbound_port; /* 15001; 0 = not configured yet: the program then touches nothing */
    u16 inbound_port;  /* 15006 */
    u16 hbone_port;    /* 15008 */
    u8 fail_open;      /* 1: pass SYNs on when no listener is there (debugging only) */
    u8 early_demux_saved; /* loader only: 1 + the netns' tcp_early_demux before the agent cleared it; 0 = untouched */
    u32 mark;          /* skb->mark bits set on assigned packets (policy routing: fwmark rule -> local table) */
    u32 mark_mask;
    u32 layout_version;
    u64 netns_cookie;  /* inode of the node netns that owns these pins; a different netns must not adopt them */
};

/* Indices of ambit_stats (global per-CPU counters). */
#define AMBIT_STAT_ASSIGN_EXISTING 0  /* packet handed to a socket the node already owns */
#define AMBIT_STAT_CAPTURE_OUTBOUND 1
#define AMBIT_STAT_CAPTURE_INBOUND 2
#define AMBIT_STAT_CAPTURE_HBONE 3
#define AMBIT_STAT_DROP_NO_LISTENER 4 /* fail closed */
#define AMBIT_STAT_PASS_NO_LISTENER 5 /* fail open */
#define AMBIT_STAT_DROP_ASSIGN_ERROR 6
#define AMBIT_STAT_UNPARSED 7         /* TCP of an enrolled workload whose header cannot be read (dropped) */
#define AMBIT_STAT_DROP_SPOOFED 8     /* TCP from an enrolled workload's address arriving where it does not live */
#define AMBIT_STAT_PASS_AGENT 9       /* SYN of the agent's own connection from inside a pod, let through */
#define AMBIT_STAT_MAX 10

/* Key of ambit_agent_conns: one TCP connection by its addresses and ports (network order), as the SYN carries them.
 * IPv4 uses the first 4 bytes of each address and zeroes the rest. */
struct ambit_conn_key {
    u8 family;
    u8 pad[3];
    u8 saddr[16];
    u8 daddr[16];
    u16 sport;
    u16 dport;
};

BPF_TABLE_PINNED("percpu_hash", struct ambit_addr, struct ambit_wl_counters, ambit_workloads, 16384,
                 AMBIT_PIN_DIR "/ambit_workloads");
/* Where each enrolled workload address lives: the node-side ifindex of its pod (the route to it; behind a bridge, the
 * port whose veth holds the address in the pod's netns, or the bridge when no one port does). A pod interface
 * may send TCP from an enrolled address only when it is that address's home; the agent picks the workload, and with
 * it the certificate, by source address, so this is what keeps pod A from borrowing pod B's identity. Kept apart
 * from ambit_workloads because that value is per-CPU counters: the home is one shared word the agent rewrites when
 * a pod address moves, without resetting (or racing) the counters. Written before the workload is added to
 * ambit_workloads and removed after it leaves; an enrolled address without a home may be sent from nowhere. */
BPF_TABLE_PINNED("hash", struct ambit_addr, u32, ambit_wl_home, 16384, AMBIT_PIN_DIR "/ambit_wl_home");
BPF_TABLE_PINNED("hash", u32, struct ambit_iface, ambit_ifaces, 4096, AMBIT_PIN_DIR "/ambit_ifaces");
/* TCP dropped as spoofed, per interface it came from (ifindex: a pod's, or the uplink): which pod sends as another
 * is what an operator needs to know. Touched on the drop path only; the agent removes an interface's entry with its
 * ambit_ifaces one. */
BPF_TABLE_PINNED("percpu_hash", u32, u64, ambit_if_spoofed, 4096, AMBIT_PIN_DIR "/ambit_if_spoofed");
/* Ports of bridges that carry the program (AMBIT_IF_BRIDGE_PORT): written before the port's ambit_ifaces entry and
 * removed with it. */
BPF_TABLE_PINNED("hash", u32, struct ambit_bridge_port, ambit_bridge_ports, 4096, AMBIT_PIN_DIR "/ambit_bridge_ports");
/* Connections the agent opens from inside an enrolled pod's netns (agent/pod_netns.py): passthrough leaves through
 * the pod's interface, as ztunnel's in-pod sockets, so the node's forward hook (where CNIs enforce egress
 * NetworkPolicy) sees it as the pod's own. Its SYN crosses the pod's interface like one of the pod's and is let
 * through instead of captured: the agent writes the tuple after binding its socket in the pod (the port is its
 * own there, no process of the pod can hold it meanwhile) and deletes it once the connect is done. LRU so that
 * what an agent killed in between left behind cannot fill it; the agent empties it when it starts. */
BPF_TABLE_PINNED("lru_hash", struct ambit_conn_key, u8, ambit_agent_conns, 16384, AMBIT_PIN_DIR "/ambit_agent_conns");
BPF_TABLE_PINNED("array", u32, struct ambit_config, ambit_config, 1, AMBIT_PIN_DIR "/ambit_config");
BPF_TABLE_PINNED("percpu_array", u32, u64, ambit_stats, AMBIT_STAT_MAX, AMBIT_PIN_DIR "/ambit_stats");

#endif /* AMBIT_MAPS_H */
