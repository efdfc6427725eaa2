# Sourced by gpu_suite.sh (and its test): install carried wheels when an import is missing.
#     install_wheels WHEEL_DIR SITE_DIR MODULE...
# If "$PY" (default python3) imports every MODULE, nothing happens. Otherwise every wheel in WHEEL_DIR
# is installed offline into SITE_DIR (no index, no dependency resolution: the folder holds the whole
# set, see gpu_wheels.sh) and SITE_DIR is put first on PYTHONPATH, exported for the steps; then the
# modules must import. The image's own packages are left as they are. Returns non-zero, saying why,
# when a module is still missing.

install_wheels() {
    local dir=$1 site=$2
    shift 2
    local py="${PY:-python3}" imports
    imports=$(IFS=,; echo "$*")
    "$py" -c "import $imports" 2>/dev/null && return 0
    if ! compgen -G "$dir/*.whl" >/dev/null; then
        echo "install_wheels: '$py' cannot import one of: $*, and $dir holds no wheels (make them with" \
             "bash benchmarks/gpu_wheels.sh); the steps that need them will fail or skip"
        return 1
    fi
    PIP_NO_INDEX=1 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --disable-pip-version-check --target "$site" "$dir"/*.whl || return 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    "$py" -c "import $imports" && echo "install_wheels: installed $(ls "$dir" | tr '\n' ' ')into $site"
}
