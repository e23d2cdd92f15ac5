#!/bin/sh
# Fills in this worker's values in nginx.conf.in, then becomes nginx (the same pid: baton's
# drain signal reaches nginx's master). The filled-in file is read through a descriptor and
# removed at once: nothing is left behind, one reload after another.
set -eu
here=$(dirname "$0")
conf=$(mktemp)
sed -e "s|@PROBE@|$BATON_PROBE_ADDRESS|" -e "s|@WORKER@|$BATON_WORKER_ID|" \
    -e "s|@RUN@|${NGINX_RUN_DIR:-/tmp}|" -e "s|@GENERATION@|$BATON_GENERATION|" \
    "$here/nginx.conf.in" > "$conf"
exec 9< "$conf"
rm -f "$conf"
exec nginx -c /dev/fd/9
