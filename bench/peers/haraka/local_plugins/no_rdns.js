// no_rdns: names every client "localhost" in the lookup_rdns hook, so Haraka does no
// reverse DNS lookup per connection (its core does one unless a plugin answers here).
// Postfix runs with smtpd_peername_lookup = no and Exim with host_lookup unset in the
// bench, the same way; and the bench sends no DNS query off this host.
'use strict'

exports.hook_lookup_rdns = function (next) {
    next(OK, 'localhost')
}
