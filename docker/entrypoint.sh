#!/bin/sh
# Entrypoint of the VX11 Gateway image.
#
#   (no arguments)          the gateway: the image's CMD, the README's production command
#   migrate [ARGS]          python manage.py migrate --noinput [ARGS]
#   manage COMMAND [ARGS]   python manage.py COMMAND [ARGS]
#   anything else           executed as given, e.g. python manage.py run_health_checks
set -eu

# prometheus_client's multiprocess mode needs an empty folder before the workers start:
# files left by processes of an earlier run would be summed into /metrics.
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
    find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -maxdepth 1 -name '*.db' -delete
fi

case "${1:-}" in
    uvicorn)
        # Load the application once before uvicorn does: with --workers N, uvicorn's
        # supervisor restarts a worker that refuses to start (no VX11_TOKEN in production)
        # again and again instead of exiting. Here the container stops with the reason.
        # (Without the metrics folder, so this short-lived process leaves no files there.)
        env -u PROMETHEUS_MULTIPROC_DIR python -c "import vx11site.asgi"
        ;;
    migrate)
        shift
        exec python manage.py migrate --noinput "$@"
        ;;
    manage)
        shift
        exec python manage.py "$@"
        ;;
    "")
        echo "usage: entrypoint.sh migrate | manage COMMAND [ARGS] | PROGRAM [ARGS]" >&2
        exit 2
        ;;
esac
exec "$@"
