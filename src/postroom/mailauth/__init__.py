"""Mail authentication: DKIM signing and keys, SRS, ARC sealing, the domain's DNS records,
and the checks of what strangers send."""
