#!/usr/bin/env bash
# The Docker image's command: nginx in front on $PORT, gunicorn behind it on a unix socket.
#
# nginx reads every request whole before gunicorn sees it, so slow or idle clients never hold a request
# thread (deploy/nginx.conf says why). This script is the container's first process: it starts both,
# passes a stop signal on (gunicorn drains its requests, nginx finishes the answers in flight), and
# when either one exits it stops the other and exits too, so that the platform's restart brings the
# pair back rather than leaving half of it serving.
#
#   deploy/serve.sh                       # what the image runs (PORT, default app/settings.py's)
#   MEMFIT_RUN_DIR=/tmp/x deploy/serve.sh # where the socket, nginx's config and temp files go
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
port=${PORT:-8000}
run_dir=${MEMFIT_RUN_DIR:-/tmp/memfit-serve}
socket="$run_dir/gunicorn.sock"

case "$port" in
  ''|*[!0-9]*) echo "serve.sh: PORT=$port is not a port number" >&2; exit 2 ;;
esac
command -v nginx >/dev/null || { echo "serve.sh: nginx is not installed (the image has it; see the Dockerfile)" >&2; exit 2; }
mkdir -p "$run_dir"
sed -e "s|@PORT@|$port|g" -e "s|@SOCKET@|$socket|g" -e "s|@RUN_DIR@|$run_dir|g" \
  "$here/nginx.conf" > "$run_dir/nginx.conf"
rm -f "$socket"

# nginx appends the address it received from to X-Forwarded-For, as the platform's router does: one
# more proxy for the rate limits to skip (app/limits.py's client_address).
export TRUSTED_PROXIES=$(( ${TRUSTED_PROXIES:-0} + 1 ))
export GUNICORN_BIND="unix:$socket"

cd "$root"
gunicorn -c gunicorn.conf.py "app:create_app()" &
gunicorn_pid=$!
# Run as root (a developer's machine, CI), nginx's workers would become "nobody", who may not enter
# the socket's folder; the image runs as its own user, and nginx's workers with it.
as_user=()
if [ "$(id -u)" = 0 ]; then as_user=(-g "user root;"); fi
nginx -c "$run_dir/nginx.conf" -e stderr "${as_user[@]}" &
nginx_pid=$!

stop() {
  # gunicorn first: it stops taking requests and drains; nginx then finishes what it is sending.
  kill -TERM "$gunicorn_pid" 2>/dev/null || true
  wait "$gunicorn_pid" 2>/dev/null || true
  kill -QUIT "$nginx_pid" 2>/dev/null || true
  # QUIT lets nginx finish the answers it is sending; TERM if it has not gone within 10 s.
  for _ in $(seq 1 100); do kill -0 "$nginx_pid" 2>/dev/null || break; sleep 0.1; done
  kill -TERM "$nginx_pid" 2>/dev/null || true
}
trap 'stop; wait; exit 0' TERM INT

# Until one of the two exits (a crash, or gunicorn stopping because its workers cannot boot).
set +e
wait -n "$gunicorn_pid" "$nginx_pid"
status=$?
set -e
if kill -0 "$gunicorn_pid" 2>/dev/null; then which=nginx; else which=gunicorn; fi
echo "serve.sh: $which exited with status $status; stopping the other" >&2
stop
wait
exit "$status"
