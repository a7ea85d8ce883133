/* Packet parsing for the redirect program: copies the few TCP/IP fields the decision needs into a small struct so
 * the rest of the program never holds packet pointers (which a pull or a helper call would invalidate). */
#ifndef AMBIT_PARSE_H
#define AMBIT_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>

#define AMBIT_IP_OFFSET_MASK 0x1fff
#define AMBIT_IP_MF 0x2000

enum ambit_parse_result {
    AMBIT_PARSE_TCP = 0,    /* addresses and l4_off are filled (ports and flags by ambit_parse_tcp) */
    AMBIT_PARSE_OTHER = 1,  /* not TCP over IPv4/IPv6: not ours */
    AMBIT_PARSE_SHORT = 2,  /* (maybe) TCP that must not be captured as read; addresses are filled in */
    AMBIT_PARSE_OPAQUE = 3, /* more VLAN headers than AMBIT_MAX_VLAN: whose it is cannot be told */
    AMBIT_PARSE_FRAGMENT = 4, /* a later fragment (IPv4: of a TCP datagram; IPv6: of any): addresses and frag_id
                               * filled, no TCP header */
};

/* Addresses use the map key layout: IPv4 in the first 4 bytes (network order), the rest zero. */
struct ambit_pkt {
    u8 family; /* AMBIT_AF_INET or AMBIT_AF_INET6 */
    u8 syn;
    u8 ack;
    u8 first_fragment; /* the datagram is fragmented and this is its first fragment (frag_id is set) */
    u32 frag_id;       /* IPv4 identification or IPv6 fragment header identification (network order) */
    u16 sport; /* network order */
    u16 dport;
    u32 l4_off; /* byte offset of the TCP header */
    u32 saddr[4];
    u32 daddr[4];
};

/* Reads the TCP header (bpf_skb_load_bytes: works for non-linear skbs too). Called only for packets that concern
 * an enrolled workload, so other pods' TCP costs no helper call. */
static __always_inline int ambit_parse_tcp(struct __sk_buff *skb, struct ambit_pkt *p) {
    struct tcphdr th;
    if (bpf_skb_load_bytes(skb, p->l4_off, &th, sizeof(th)))
        return AMBIT_PARSE_SHORT;
    p->sport = th.source;
    p->dport = th.dest;
    p->syn = th.syn;
    p->ack = th.ack;
    return AMBIT_PARSE_TCP;
}

#define AMBIT_V6_MAX_EXT 4
#define AMBIT_NEXTHDR_HOP 0
#define AMBIT_NEXTHDR_ROUTING 43
#define AMBIT_NEXTHDR_FRAGMENT 44
#define AMBIT_NEXTHDR_AUTH 51
#define AMBIT_NEXTHDR_DEST 60

/* Walks IPv6 extension headers (as ip6tables does) so TCP cannot slip past capture behind a hop-by-hop,
 * routing, destination-options, fragment or AH header. More than AMBIT_V6_MAX_EXT of them is AMBIT_PARSE_SHORT
 * (the caller fails closed for enrolled sources). */
static __always_inline int ambit_v6_find_tcp(struct __sk_buff *skb, u8 nexthdr, struct ambit_pkt *p) {
    u32 off = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
    p->l4_off = off;
#pragma unroll
    for (int i = 0; i < AMBIT_V6_MAX_EXT; i++) {
        if (nexthdr == IPPROTO_TCP) {
            p->l4_off = off;
            return AMBIT_PARSE_TCP;
        }
        u8 hdr[8];
        if (nexthdr == AMBIT_NEXTHDR_HOP || nexthdr == AMBIT_NEXTHDR_ROUTING || nexthdr == AMBIT_NEXTHDR_DEST) {
            if (bpf_skb_load_bytes(skb, off, hdr, 2))
                return AMBIT_PARSE_SHORT;
            off += ((u32)hdr[1] + 1) * 8;
        } else if (nexthdr == AMBIT_NEXTHDR_AUTH) {
            if (bpf_skb_load_bytes(skb, off, hdr, 2))
                return AMBIT_PARSE_SHORT;
            off += ((u32)hdr[1] + 2) * 4;
        } else if (nexthdr == AMBIT_NEXTHDR_FRAGMENT) {
            if (bpf_skb_load_bytes(skb, off, hdr, 8))
                return AMBIT_PARSE_SHORT;
            __builtin_memcpy(&p->frag_id, &hdr[4], 4);
            /* A later fragment carries no TCP header. Whatever next header it names, reassembly takes the first
             * fragment's (RFC 8200 keys a datagram by addresses and identification only), so it may complete a TCP
             * datagram: every later fragment is reported, not only those that say TCP. */
            if ((hdr[2] << 8 | hdr[3]) & 0xfff8)
                return AMBIT_PARSE_FRAGMENT;
            p->first_fragment = hdr[3] & 1; /* M: more fragments follow */
            off += 8;
        } else {
            return AMBIT_PARSE_OTHER; /* UDP, ICMPv6, ESP, ...: not ours */
        }
        nexthdr = hdr[0];
    }
    p->l4_off = off;
    return nexthdr == IPPROTO_TCP ? AMBIT_PARSE_TCP : AMBIT_PARSE_SHORT;
}

#define AMBIT_MAX_VLAN 4

struct ambit_vlan {
    __be16 tci;
    __be16 proto; /* the EtherType behind this header */
};

static __always_inline int ambit_is_vlan(__be16 proto) {
    return proto == htons(ETH_P_8021Q) || proto == htons(ETH_P_8021AD);
}

/* A frame that still starts with a VLAN header at tc ingress. The kernel strips one VLAN header before tc runs and,
 * after tc, every further header with VLAN ID 0 (802.1p priority tags) when no VLAN device claims it, so two or more
 * priority tags carry IP past this program into routing: a pod with CAP_NET_RAW, or a host on the uplink's L2, could
 * send TCP around capture and anti-spoofing. The addresses behind the tags are read so the caller can decide by
 * workload: such TCP is AMBIT_PARSE_SHORT (never captured, dropped when an enrolled workload is either end), the
 * rest keeps its way. A slow path: no ordinary frame has a VLAN header left here. */
static __always_inline int ambit_parse_tagged(struct __sk_buff *skb, __be16 proto, struct ambit_pkt *p) {
    u32 off = sizeof(struct ethhdr);
#pragma unroll
    for (int i = 0; i < AMBIT_MAX_VLAN; i++) {
        if (!ambit_is_vlan(proto))
            break;
        struct ambit_vlan vh;
        if (bpf_skb_load_bytes(skb, off, &vh, sizeof(vh)))
            return AMBIT_PARSE_OTHER; /* truncated: the kernel drops it when it pops this header */
        proto = vh.proto;
        off += sizeof(vh);
    }
    if (ambit_is_vlan(proto))
        return AMBIT_PARSE_OPAQUE;
    if (proto == htons(ETH_P_IP)) {
        struct iphdr iph;
        if (bpf_skb_load_bytes(skb, off, &iph, sizeof(iph)) || iph.protocol != IPPROTO_TCP)
            return AMBIT_PARSE_OTHER;
        p->family = AMBIT_AF_INET;
        p->saddr[0] = iph.saddr;
        p->daddr[0] = iph.daddr;
        return AMBIT_PARSE_SHORT;
    }
    if (proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)))
            return AMBIT_PARSE_OTHER;
        u8 nh = ip6.nexthdr;
        if (nh != IPPROTO_TCP && nh != AMBIT_NEXTHDR_HOP && nh != AMBIT_NEXTHDR_ROUTING && nh != AMBIT_NEXTHDR_DEST &&
            nh != AMBIT_NEXTHDR_FRAGMENT && nh != AMBIT_NEXTHDR_AUTH)
            return AMBIT_PARSE_OTHER;
        p->family = AMBIT_AF_INET6;
        __builtin_memcpy(p->saddr, &ip6.saddr, 16);
        __builtin_memcpy(p->daddr, &ip6.daddr, 16);
        return AMBIT_PARSE_SHORT;
    }
    return AMBIT_PARSE_OTHER;
}

/* Finds the addresses and the TCP header's offset. Non-TCP traffic leaves after the EtherType and protocol checks:
 * no map lookup, no helper call. On AMBIT_PARSE_SHORT the addresses are filled in, so the caller can still decide
 * by workload. */
static __always_inline int ambit_parse(struct __sk_buff *skb, struct ambit_pkt *p) {
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return AMBIT_PARSE_OTHER;
    if (eth->h_proto == htons(ETH_P_IP)) {
        struct iphdr *iph = (void *)(eth + 1);
        if ((void *)(iph + 1) > data_end)
            return AMBIT_PARSE_OTHER;
        if (iph->protocol != IPPROTO_TCP)
            return AMBIT_PARSE_OTHER;
        u32 ihl = (iph->ihl & 0xf) * 4;
        if (ihl < sizeof(struct iphdr))
            return AMBIT_PARSE_OTHER;
        p->family = AMBIT_AF_INET;
        p->saddr[0] = iph->saddr;
        p->daddr[0] = iph->daddr;
        p->frag_id = iph->id;
        if (iph->frag_off & htons(AMBIT_IP_OFFSET_MASK))
            return AMBIT_PARSE_FRAGMENT;
        p->first_fragment = !!(iph->frag_off & htons(AMBIT_IP_MF));
        p->l4_off = sizeof(struct ethhdr) + ihl;
        return AMBIT_PARSE_TCP;
    }
    if (eth->h_proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return AMBIT_PARSE_OTHER;
        u8 nexthdr = ip6->nexthdr;
        if (nexthdr != IPPROTO_TCP && nexthdr != AMBIT_NEXTHDR_HOP && nexthdr != AMBIT_NEXTHDR_ROUTING &&
            nexthdr != AMBIT_NEXTHDR_DEST && nexthdr != AMBIT_NEXTHDR_FRAGMENT && nexthdr != AMBIT_NEXTHDR_AUTH)
            return AMBIT_PARSE_OTHER;
        p->family = AMBIT_AF_INET6;
        __builtin_memcpy(p->saddr, &ip6->saddr, 16);
        __builtin_memcpy(p->daddr, &ip6->daddr, 16);
        return ambit_v6_find_tcp(skb, nexthdr, p);
    }
    if (ambit_is_vlan(eth->h_proto))
        return ambit_parse_tagged(skb, eth->h_proto, p);
    return AMBIT_PARSE_OTHER;
}

#endif /* AMBIT_PARSE_H */
