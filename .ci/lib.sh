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
