# Shared by the CI scripts: source it from the repository root.

# Prints the command on the line after the ```bash line that follows the
# `<!-- ci:NAME -->` marker in README.md, so that CI runs what the README says.
readme_command() {
  local command
  command=$(awk -v marker="<!-- ci:$1 -->" '$0 == marker {getline; getline; print; exit}' README.md)
  if [ -z "$command" ]; then
    echo "README.md has no command after <!-- ci:$1 -->" >&2
    exit 1
  fi
  printf '%s' "$command"
}

# Prints the path of a Python interpreter of version $1 (e.g. 3.13): `python3.13` on
# the PATH if it runs, else pyenv's (the machine image ships pyenv with 3.12 and 3.13).
python_of_version() {
  local candidate
  for candidate in "python$1" "$(pyenv root 2>/dev/null)/versions/$1"*/bin/"python$1"; do
    if "$candidate" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$1'.split('.')))" \
      >/dev/null 2>&1; then
      command -v "$candidate"
      return
    fi
  done
  echo "no Python $1: neither python$1 on the PATH nor pyenv's" >&2
  return 1
}

# Leaves the caller's virtual environment: nothing of it may leak into a fresh one.
leave_venv() {
  if [ -n "${VIRTUAL_ENV:-}" ]; then
    PATH=${PATH//"$VIRTUAL_ENV/bin:"/}
    unset VIRTUAL_ENV
  fi
  unset PYTHONHOME PYTHONPATH
}

# The versions of the packages named in $2.. in the environment of the Python $1, one
# `name==version` line each (absent: `name==absent`).
versions_of() {
  local python=$1
  shift
  "$python" - "$@" <<'PY'
import importlib.metadata as metadata
import sys

for name in sys.argv[1:]:
  try:
    print(f"{name}=={metadata.version(name)}")
  except metadata.PackageNotFoundError:
    print(f"{name}==absent")
PY
}

# What the other stacks' suites leave to the README's: the benchmark scripts' smoke runs,
# the multilingual experiment's command line and its race harness (the project's tools;
# the notebooks run the experiment's code on every stack).
# shellcheck disable=SC2034
README_STACK_ONLY=(
  --ignore=tests/test_benchmarks.py
  --ignore=tests/test_examples.py
  --ignore=tests/test_race.py
)
