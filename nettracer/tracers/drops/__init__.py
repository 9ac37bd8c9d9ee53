"""The drop monitor: where, why and on which interface the kernel drops packets.

``program`` builds the eBPF program on ``skb:kfree_skb`` and holds the records it
shares with user space, ``monitor`` loads it and reads its maps, ``groups`` turns
counts into the groups and names a report shows.
"""
