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

enum ambit_parse_result {
    AMBIT_PARSE_TCP = 0,   /* p is filled */
    AMBIT_PARSE_OTHER = 1, /* not TCP over IPv4/IPv6 (or a non-first fragment): not ours */
    AMBIT_PARSE_SHORT = 2, /* TCP whose header cannot be read */
};

/* Addresses use the map key layout: IPv4 in the first 4 bytes (network order), the rest zero. */
struct ambit_pkt {
    u8 family; /* AMBIT_AF_INET or AMBIT_AF_INET6 */
    u8 syn;
    u8 ack;
    u8 pad;
    u16 sport; /* network order */
    u16 dport;
    u32 saddr[4];
    u32 daddr[4];
};

/* Reads the TCP header at byte offset `off`, pulling non-linear data in once if needed. */
static __always_inline int ambit_parse_tcp(struct __sk_buff *skb, u32 off, struct ambit_pkt *p) {
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    if (off > 120) /* eth + at most 60 bytes of IPv4 header or the fixed 40 of IPv6 */
        return AMBIT_PARSE_SHORT;
    if (data + off + sizeof(struct tcphdr) > data_end) {
        if (bpf_skb_pull_data(skb, off + sizeof(struct tcphdr)))
            return AMBIT_PARSE_SHORT;
        data = (void *)(long)skb->data;
        data_end = (void *)(long)skb->data_end;
    }
    struct tcphdr *th = data + off;
    if ((void *)(th + 1) > data_end)
        return AMBIT_PARSE_SHORT;
    p->sport = th->source;
    p->dport = th->dest;
    p->syn = th->syn;
    p->ack = th->ack;
    return AMBIT_PARSE_TCP;
}

/* Non-TCP traffic leaves after the EtherType and protocol checks: no map lookup, no helper call. IPv6 packets whose
 * first header after the fixed one is not TCP (extension headers) are not parsed further. */
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
        if (iph->frag_off & htons(AMBIT_IP_OFFSET_MASK))
            return AMBIT_PARSE_OTHER;
        u32 ihl = (iph->ihl & 0xf) * 4;
        if (ihl < sizeof(struct iphdr))
            return AMBIT_PARSE_OTHER;
        p->family = AMBIT_AF_INET;
        p->saddr[0] = iph->saddr;
        p->daddr[0] = iph->daddr;
        return ambit_parse_tcp(skb, sizeof(struct ethhdr) + ihl, p);
    }
    if (eth->h_proto == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end)
            return AMBIT_PARSE_OTHER;
        if (ip6->nexthdr != IPPROTO_TCP)
            return AMBIT_PARSE_OTHER;
        p->family = AMBIT_AF_INET6;
        __builtin_memcpy(p->saddr, &ip6->saddr, 16);
        __builtin_memcpy(p->daddr, &ip6->daddr, 16);
        return ambit_parse_tcp(skb, sizeof(struct ethhdr) + sizeof(struct ipv6hdr), p);
    }
    return AMBIT_PARSE_OTHER;
}

#endif /* AMBIT_PARSE_H */
