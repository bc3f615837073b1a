# Make or reuse the project's virtual environment and install the package into it; sourced by the two
# commands at the top of README (scripts/test_attention_free_setup.sh, scripts/run_tests.sh).
#
# Environment: VENV (default .venv); TORCH_INSTALL, pip's arguments for torch when the environment has none
# (default: the CUDA build from PyPI where nvidia-smi sees a GPU, else the CPU build from PyTorch's index).
# Exports PYTHON, the environment's interpreter, for the scripts that follow.
venv=${VENV:-.venv}
if [[ ! -x $venv/bin/python ]]; then
  echo "== creating the virtual environment $venv" >&2
  python3 -m venv "$venv"
fi
PYTHON=$venv/bin/python
export PYTHON
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  if [[ -n ${TORCH_INSTALL:-} ]]; then
    read -ra torch_install <<<"$TORCH_INSTALL"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    torch_install=(torch)
  else
    torch_install=(torch --index-url https://download.pytorch.org/whl/cpu)
  fi
  echo "== installing ${torch_install[*]} into $venv" >&2
  "$PYTHON" -m pip install --quiet "${torch_install[@]}"
fi
# Reinstall the package only when its dependencies change.
stamp=$venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [[ ! -f $stamp ]]; then
  echo "== installing the package and its test tools into $venv" >&2
  "$PYTHON" -m pip install --quiet -e '.[test]'
  touch "$stamp"
fi
