/* Packet parsing for the redirect program: copies the few TCP/IP fields the decision needs into a small struct so
 * the rest of the program never holds packet pointers (which a pull or a helper call would invalidate). */
#ifndef AMBIT_PARSE_H
#define AMBIT_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>

#define AMBIT_IP_OFFSET_MASK 0x1fff

enum ambit_parse_result {
    AMBIT_PARSE_TCP = 0,   /* p is filled */
    AMBIT_PARSE_OTHER = 1, /* not IPv4 TCP (or a non-first fragment): not ours */
    AMBIT_PARSE_SHORT = 2, /* IPv4 TCP whose header cannot be read */
};

struct ambit_pkt {
    u32 saddr; /* network order */
    u32 daddr;
    u16 sport; /* network order */
    u16 dport;
    u8 syn;
    u8 ack;
};

/* Non-TCP traffic leaves after the EtherType and protocol checks: no map lookup, no helper call. */
static __always_inline int ambit_parse(struct __sk_buff *skb, struct ambit_pkt *p) {
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return AMBIT_PARSE_OTHER;
    if (eth->h_proto != htons(ETH_P_IP))
        return AMBIT_PARSE_OTHER; /* IPv6 follows with the same map keys */
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
    u32 need = sizeof(struct ethhdr) + ihl + sizeof(struct tcphdr);
    if (data + need > data_end) {
        /* Headers outside the linear area: pull them in once, then every pointer must be re-derived. */
        if (bpf_skb_pull_data(skb, need))
            return AMBIT_PARSE_SHORT;
        data = (void *)(long)skb->data;
        data_end = (void *)(long)skb->data_end;
        if (data + need > data_end)
            return AMBIT_PARSE_SHORT;
        iph = data + sizeof(struct ethhdr);
        if ((void *)(iph + 1) > data_end)
            return AMBIT_PARSE_SHORT;
    }
    struct tcphdr *th = (void *)iph + ihl;
    if ((void *)(th + 1) > data_end)
        return AMBIT_PARSE_SHORT;
    p->saddr = iph->saddr;
    p->daddr = iph->daddr;
    p->sport = th->source;
    p->dport = th->dest;
    p->syn = th->syn;
    p->ack = th->ack;
    return AMBIT_PARSE_TCP;
}

#endif /* AMBIT_PARSE_H */
