/* Ambit capture: one tc (SCHED_CLS, direct-action) program on the ingress of
 *   - the node-side interface of local pods (AMBIT_IF_POD): the pod's egress. TCP from an enrolled workload is
 *     captured to the outbound listener; TCP from a non-enrolled pod to an enrolled local workload to the inbound
 *     (plaintext) listener;
 *   - the node's uplink (AMBIT_IF_UPLINK): TCP for an enrolled local workload is captured to the HBONE listener
 *     when it targets port 15008, to the inbound listener otherwise.
 * Packets of sockets the node netns already owns (the agent's accepted connections, request sockets, TIME_WAIT
 * sockets, and its source-preserving upstream connections) are handed to those sockets. Capture means
 * bpf_sk_assign + a mark that policy routing turns into local delivery (fwmark rule -> `local 0/0 dev lo` table).
 *
 * Bridge CNIs: the ports of a bridge that holds pods carry the program as well (AMBIT_IF_BRIDGE_PORT, see
 * ambit_maps.h), since the bridge switches frames between its pods without passing them up. A port decides (and
 * counts) as its role says (the home of a pod behind it is the port itself, see ambit_at_home), and sends what it
 * captures up to the bridge: destination MAC rewritten to the bridge's, marked. The bridge keeps the mark and MAC
 * but drops a socket assignment on the way (seen on 6.18), so the bridge's own program makes the assignment for
 * marked packets (ambit_assign_steered). On a bridge, port 15008 of an enrolled pod is the HBONE listener's for any
 * caller, local ones included (as in Istio, where 15008 is ztunnel's inside the pod).
 *
 * On a pod interface, TCP whose source is an enrolled workload that lives behind another interface (ambit_wl_home)
 * is dropped: the agent takes the source workload, hence the identity, from the source address. On the uplink, TCP
 * from an enrolled workload's address to an enrolled one is dropped likewise. TCP from a source that is not enrolled
 * at all keeps its way (see docs/architecture.md, "Capture").
 *
 * Handles IPv4 and IPv6 (workload keys carry the family; TCP behind up to AMBIT_V6_MAX_EXT IPv6 extension headers
 * is found). TCP that cannot be read safely (truncated, deeper extension headers, behind VLAN headers that the kernel
 * pops only after tc) is never captured and, when it concerns an enrolled workload, dropped.
 *
 * Everything else returns TC_ACT_UNSPEC so the next tc filter still classifies it: this program never ends
 * classification for traffic that is not the mesh's. A new connection that should be captured but finds no
 * listener is dropped (fail closed) unless the config says fail_open.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "ambit_maps.h"
#include "ambit_parse.h"

/* A fragmented TCP datagram: its later fragments carry no ports, so they are recognised by the first one's key. */
struct ambit_frag_key {
    u8 family;
    u8 pad[3];
    u32 id;
    u32 saddr[4];
    u32 daddr[4];
};

/* Fragmented TCP datagrams whose first fragment was captured (or assigned) -> the interface it came in on. Their
 * later fragments must reach the node's stack too, where the datagram is reassembled for the socket: forwarded on
 * to the pod instead, they left the node's reassembly waiting and the connection stalled. Transient state, so not
 * pinned (an agent restart drops the datagrams in flight); LRU, so a flood of first fragments only evicts. */
BPF_TABLE("lru_hash", struct ambit_frag_key, u32, ambit_frags, 4096);

static __always_inline void ambit_stat(u32 idx) {
    u64 *v = ambit_stats.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline void ambit_key(struct ambit_addr *k, u8 family, const u32 *addr) {
    k->family = family;
    __builtin_memcpy(k->addr, addr, 16);
}

/* Drops a packet sent from an enrolled workload's address where that workload does not live, counted node-wide and
 * against the interface it came in on (which pod, or the uplink, sends as another). */
static __always_inline int ambit_drop_spoofed(u32 ifindex) {
    ambit_stat(AMBIT_STAT_DROP_SPOOFED);
    u64 zero = 0;
    u64 *by_if = ambit_if_spoofed.lookup_or_try_init(&ifindex, &zero);
    if (by_if)
        *by_if += 1;
    return TC_ACT_SHOT;
}

static __always_inline void ambit_frag_key(struct ambit_frag_key *k, const struct ambit_pkt *p) {
    k->family = p->family;
    k->id = p->frag_id;
    __builtin_memcpy(k->saddr, p->saddr, 16);
    __builtin_memcpy(k->daddr, p->daddr, 16);
}

/* Whether an enrolled address whose home is `home` may send from interface `ifindex`. Its home is normally that very
 * interface: a pod's veth, or on a bridge CNI the port whose far end holds the address. At a bridge port (`port`),
 * a home the agent only knows as the bridge (no port found for it) is accepted too. At a bridge, a home that is one of
 * its ports is: a frame of that pod sent to the bridge's address and not captured at the port (mid-stream) is passed
 * up to the bridge after the port's own check. */
static __always_inline int ambit_at_home(u32 home, u32 ifindex, const struct ambit_bridge_port *port) {
    if (home == ifindex)
        return 1;
    if (port)
        return home == port->bridge;
    struct ambit_bridge_port *home_port = ambit_bridge_ports.lookup(&home);
    return home_port && home_port->bridge == ifindex;
}

/* A later fragment of a datagram whose first fragment was captured here: delivered to the node's stack as well (no
 * socket to assign without ports; the reassembled datagram finds the connection's socket by its 4-tuple). */
static __always_inline int ambit_later_fragment(struct __sk_buff *skb, const struct ambit_pkt *p,
                                                const struct ambit_config *cfg, u32 ifindex,
                                                struct ambit_bridge_port *port) {
    struct ambit_frag_key k = {};
    ambit_frag_key(&k, p);
    u32 *from = ambit_frags.lookup(&k);
    if (!from || *from != ifindex)
        return TC_ACT_UNSPEC;
    if (port && bpf_skb_store_bytes(skb, 0, port->mac, ETH_ALEN, 0)) {
        ambit_stat(AMBIT_STAT_DROP_ASSIGN_ERROR);
        return TC_ACT_SHOT;
    }
    skb->mark = (skb->mark & ~cfg->mark_mask) | cfg->mark;
    return TC_ACT_OK;
}

/* The agent listener (port, host order) a new connection is captured to. An enrolled pod's port 15008 is the
 * agent's HBONE listener whoever calls and through whichever interface (a peer node's agent over the uplink, or a
 * waypoint or east-west gateway on this node through its veth), as in Istio, where 15008 inside the pod is
 * ztunnel's: the plaintext listener would relay the caller's TLS to a pod port where nothing listens. */
static __always_inline u16 ambit_listener(const struct ambit_config *cfg, u8 outbound, u16 dport) {
    if (outbound)
        return cfg->outbound_port;
    if (dport == htons(cfg->hbone_port))
        return cfg->hbone_port;
    return cfg->inbound_port;
}

static __always_inline int ambit_agent_conn(const struct ambit_pkt *p) {
    struct ambit_conn_key k = {};
    k.family = p->family;
    __builtin_memcpy(k.saddr, p->saddr, 16);
    __builtin_memcpy(k.daddr, p->daddr, 16);
    k.sport = p->sport;
    k.dport = p->dport;
    return ambit_agent_conns.lookup(&k) != NULL;
}

/* bpf_skc_lookup_tcp in the node netns for the packet's tuple with destination port `dport`. */
static __always_inline struct bpf_sock *ambit_lookup(struct __sk_buff *skb, const struct ambit_pkt *p, u16 dport) {
    struct bpf_sock_tuple t = {};
    if (p->family == AMBIT_AF_INET) {
        t.ipv4.saddr = p->saddr[0];
        t.ipv4.daddr = p->daddr[0];
        t.ipv4.sport = p->sport;
        t.ipv4.dport = dport;
        return bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    }
    __builtin_memcpy(t.ipv6.saddr, p->saddr, 16);
    __builtin_memcpy(t.ipv6.daddr, p->daddr, 16);
    t.ipv6.sport = p->sport;
    t.ipv6.dport = dport;
    return bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
}

/* A socket for the tuple that is not a listener (NULL: none; the reference is released). */
static __always_inline struct bpf_sock *ambit_owner(struct __sk_buff *skb, const struct ambit_pkt *p) {
    struct bpf_sock *sk = ambit_lookup(skb, p, p->dport);
    if (sk && sk->state == BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        sk = NULL;
    }
    return sk;
}

/* The listener on `port` (host order), or NULL. */
static __always_inline struct bpf_sock *ambit_listening(struct __sk_buff *skb, const struct ambit_pkt *p, u16 port) {
    struct bpf_sock *sk = ambit_lookup(skb, p, htons(port));
    if (sk && sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        sk = NULL;
    }
    return sk;
}

/* At a bridge, a packet one of its ports captured: assign it (again) to the socket the port found. Decided, checked
 * and counted at the port already; a socket gone meanwhile means the packet is dropped. */
static __always_inline int ambit_assign_steered(struct __sk_buff *skb, struct ambit_pkt *p, struct ambit_config *cfg) {
    if (ambit_parse_tcp(skb, p) != AMBIT_PARSE_TCP)
        return TC_ACT_SHOT;
    struct bpf_sock *sk = ambit_owner(skb, p);
    if (!sk && p->syn && !p->ack) {
        struct ambit_addr src = {};
        ambit_key(&src, p->family, p->saddr);
        u8 outbound = ambit_workloads.lookup(&src) != NULL;
        sk = ambit_listening(skb, p, ambit_listener(cfg, outbound, p->dport));
    }
    if (!sk)
        return TC_ACT_SHOT;
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err) {
        ambit_stat(AMBIT_STAT_DROP_ASSIGN_ERROR);
        return TC_ACT_SHOT;
    }
    return TC_ACT_OK;
}

int ambit_tc_ingress(struct __sk_buff *skb) {
    struct ambit_pkt p = {};
    int parsed = ambit_parse(skb, &p);
    if (parsed == AMBIT_PARSE_OTHER)
        return TC_ACT_UNSPEC;

    u32 ifindex = skb->ingress_ifindex;
    struct ambit_iface *ifc = ambit_ifaces.lookup(&ifindex);
    if (!ifc)
        return TC_ACT_UNSPEC;
    u32 zero = 0;
    struct ambit_config *cfg = ambit_config.lookup(&zero);
    if (!cfg || !cfg->outbound_port)
        return TC_ACT_UNSPEC;
    if ((ifc->flags & AMBIT_IF_BRIDGE) && parsed == AMBIT_PARSE_TCP && (skb->mark & cfg->mark_mask) == cfg->mark)
        return ambit_assign_steered(skb, &p, cfg); /* only a port's program marks: marks never cross netns */
    struct ambit_bridge_port *port = NULL;
    if (ifc->flags & AMBIT_IF_BRIDGE_PORT)
        port = ambit_bridge_ports.lookup(&ifindex);
    if (parsed == AMBIT_PARSE_FRAGMENT) {
        /* Anti-spoofing holds for later fragments too: one joins whatever datagram of its addresses and id the node
         * is reassembling, so pod A sending B's later fragment could complete a captured segment of B's with A's
         * bytes. An enrolled source's fragments are believed only on its home (never on an uplink). */
        struct ambit_addr src = {};
        ambit_key(&src, p.family, p.saddr);
        if (ambit_workloads.lookup(&src)) {
            u32 *home = ambit_wl_home.lookup(&src);
            if (!home || !ambit_at_home(*home, ifindex, port))
                return ambit_drop_spoofed(ifindex);
        }
        return ambit_later_fragment(skb, &p, cfg, ifindex, port);
    }
    if (parsed == AMBIT_PARSE_OPAQUE) {
        /* Behind so many VLAN headers that its addresses are out of reach, yet the kernel may still route it: it
         * could be an enrolled workload's TCP, so it is treated as unreadable TCP of one. */
        ambit_stat(AMBIT_STAT_UNPARSED);
        return cfg->fail_open ? TC_ACT_UNSPEC : TC_ACT_SHOT;
    }
    struct ambit_addr key = {};
    struct ambit_wl_counters *wl = NULL;
    u8 outbound = 0;
    if (ifc->flags & AMBIT_IF_POD) {
        ambit_key(&key, p.family, p.saddr);
        wl = ambit_workloads.lookup(&key);
        if (wl) {
            /* Anti-spoofing: an enrolled source address is only believed on its own pod's interface. Anything
             * else (pod A sending as pod B, a SYN or a forged segment of B's connections) is dropped before it is
             * captured or counted as B's, whatever fail_open says: this is not a missing listener. */
            u32 *home = ambit_wl_home.lookup(&key);
            if (!home || !ambit_at_home(*home, ifindex, port))
                return ambit_drop_spoofed(ifindex);
            outbound = 1;
        }
    }
    if (!wl) {
        if (!(ifc->flags & (AMBIT_IF_POD | AMBIT_IF_UPLINK)))
            return TC_ACT_UNSPEC;
        if ((ifc->flags & (AMBIT_IF_UPLINK | AMBIT_IF_BRIDGE_PORT)) == (AMBIT_IF_UPLINK | AMBIT_IF_BRIDGE_PORT)) {
            /* An uplink among a bridge's ports: what it lets through to the bridge's own address is decided again
             * at the bridge, as a pod's (the home of the pods behind the bridge is one of its ports). Another host
             * sending as an enrolled local pod would be captured as that pod's outbound call there, whatever the
             * destination: so here every TCP from such an address is dropped, not only TCP to an enrolled pod. */
            struct ambit_addr src = {};
            ambit_key(&src, p.family, p.saddr);
            if (ambit_workloads.lookup(&src))
                return ambit_drop_spoofed(ifindex);
        }
        ambit_key(&key, p.family, p.daddr);
        wl = ambit_workloads.lookup(&key);
        if (!wl)
            return TC_ACT_UNSPEC; /* neither end is an enrolled local workload: not ours, no further work */
        if (ifc->flags & AMBIT_IF_UPLINK) {
            /* An enrolled workload's packets enter at its own interface, never at the uplink (no home is one). Taken
             * from the uplink as that workload, a segment would be assigned to the agent's sockets of its same-node
             * connections, whose bytes count as its own (its identity, its policy decision). Checked only for
             * packets about to be captured or assigned: the rest of the uplink's traffic costs no extra lookup. */
            struct ambit_addr src = {};
            ambit_key(&src, p.family, p.saddr);
            if (ambit_workloads.lookup(&src))
                return ambit_drop_spoofed(ifindex);
        }
    }
    if (parsed != AMBIT_PARSE_TCP || ambit_parse_tcp(skb, &p) != AMBIT_PARSE_TCP) {
        /* TCP of an enrolled workload we cannot read (truncated, too many IPv6 extension headers, behind VLAN
         * headers the kernel pops after tc) could bypass capture: it fails closed like a SYN without listener. */
        ambit_stat(AMBIT_STAT_UNPARSED);
        return cfg->fail_open ? TC_ACT_UNSPEC : TC_ACT_SHOT;
    }

    u16 listen_port = ambit_listener(cfg, outbound, p.dport);
    u32 capture_stat = AMBIT_STAT_CAPTURE_INBOUND;
    if (outbound) {
        wl->packets += 1;
        wl->bytes += skb->len;
        capture_stat = AMBIT_STAT_CAPTURE_OUTBOUND;
    } else if (listen_port == cfg->hbone_port) {
        capture_stat = AMBIT_STAT_CAPTURE_HBONE;
    }

    /* 1. A socket in this (node) netns already owns the 4-tuple: accepted or request socket of the agent, its
     * source-preserving upstream socket (return path), or a TIME_WAIT socket. TIME_WAIT must be assigned too:
     * the kernel's TIME_WAIT logic then lets a reused 4-tuple through within milliseconds, while skipping it
     * blackholes the new SYN until the TIME_WAIT expires. */
    struct bpf_sock *sk = ambit_owner(skb, &p);
    if (sk) {
        ambit_stat(AMBIT_STAT_ASSIGN_EXISTING);
        goto assign;
    }

    /* 2. Only a new connection (SYN without ACK) is captured; anything else mid-stream (a connection that
     * predates enrollment) keeps its path. */
    if (!p.syn || p.ack)
        return TC_ACT_UNSPEC;

    /* 3. The agent's own connection from inside this pod (its tuple written by the agent): the node forwards it
     * as the pod's. Asked only of an enrolled pod's SYNs, at its home (anti-spoofing above). */
    if (outbound && ambit_agent_conn(&p)) {
        ambit_stat(AMBIT_STAT_PASS_AGENT);
        return TC_ACT_UNSPEC;
    }

    /* The agent's listener is bound to 0.0.0.0:<port> (or [::]:<port> for IPv6), so a lookup for
     * <original daddr>:<port> finds it and the accepted socket's local address stays the original destination
     * (getsockname()). The real source keeps SO_REUSEPORT groups balanced. An IPv6 SYN of an enrolled workload
     * finds no listener while the agent listens on IPv4 only, and is dropped like any other (fail closed). */
    sk = ambit_listening(skb, &p, listen_port);
    if (!sk) {
        if (cfg->fail_open) {
            ambit_stat(AMBIT_STAT_PASS_NO_LISTENER);
            return TC_ACT_UNSPEC;
        }
        wl->drops += 1;
        ambit_stat(AMBIT_STAT_DROP_NO_LISTENER);
        return TC_ACT_SHOT;
    }
    if (outbound)
        wl->conns_out += 1;
    else
        wl->conns_in += 1;
    ambit_stat(capture_stat);

assign:
    {
        /* On a bridge port the frame, addressed to the bridge, is passed up to the node's stack instead of being
         * switched to the pod it was sent to; the bridge's program assigns it (an assignment made here is lost). */
        long err = port ? bpf_skb_store_bytes(skb, 0, port->mac, ETH_ALEN, 0) : bpf_sk_assign(skb, sk, 0);
        bpf_sk_release(sk);
        if (err) {
            ambit_stat(AMBIT_STAT_DROP_ASSIGN_ERROR);
            return TC_ACT_SHOT;
        }
    }
    skb->mark = (skb->mark & ~cfg->mark_mask) | cfg->mark;
    if (p.first_fragment) {
        struct ambit_frag_key k = {};
        ambit_frag_key(&k, &p);
        ambit_frags.update(&k, &ifindex);
    }
    return TC_ACT_OK;
}
