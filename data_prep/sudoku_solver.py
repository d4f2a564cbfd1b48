"""A fast, deterministic Sudoku solver, solution counter and puzzle generator.

Boards are ``uint8[81]`` row by row, 0 for a blank, 1..9 for a digit.

The solver (numba) keeps a bitmask of candidate digits per cell (bit d for
digit d) and alternates two propagation rules until neither changes anything:

* naked single: a cell with one candidate removes it from its 20 peers;
* hidden single: a digit that fits only one cell of a row, column or box is
  placed there (computed for a whole unit at once with "seen once" / "seen
  twice" masks).

A cell with no candidate, or a unit missing a digit, is a contradiction. When
propagation stalls the solver branches (depth-first) on the unsolved cell with
the fewest candidates (MRV), the lowest cell index on ties, trying its
candidates in ascending digit order (or in a given per-cell order, used only
by the generator to draw random full grids).

Difficulty rating: the number of guesses made until the first solution is
found, where a guess is one tentative assignment of a value at a branch cell
(every candidate tried counts, including the last one of its cell). A puzzle
solved by propagation alone rates 0. The count is deterministic for a given
board (but, like any backtracking rating, not invariant under the Sudoku
symmetries). Sudoku-Extreme's ``rating`` column was made the same way with a
different solver (tdoku), so the two scales are comparable only roughly.

Solution counting stops at ``limit`` solutions (2 suffices for uniqueness).
"""

from __future__ import annotations

import concurrent.futures
import os

import numba
import numpy as np

ALL_DIGITS = np.uint16(0x3FE)  # bits 1..9


def _make_tables() -> tuple[np.ndarray, np.ndarray]:
  units = []
  for r in range(9):
    units.append([r * 9 + c for c in range(9)])
  for c in range(9):
    units.append([r * 9 + c for r in range(9)])
  for b in range(9):
    r0, c0 = 3 * (b // 3), 3 * (b % 3)
    units.append([(r0 + i) * 9 + c0 + j for i in range(3) for j in range(3)])
  peers = []
  for cell in range(81):
    ps = sorted({p for u in units if cell in u for p in u if p != cell})
    peers.append(ps)
  return np.asarray(units, np.int32), np.asarray(peers, np.int32)


UNITS_27x9, PEERS_81x20 = _make_tables()
_NATURAL_ORDER_81x9 = np.tile(np.arange(1, 10, dtype=np.int8), (81, 1))


@numba.njit(cache=True, nogil=True)
def _popcount(v):
  n = 0
  while v:
    v &= v - 1
    n += 1
  return n


@numba.njit(cache=True, nogil=True)
def _propagate(cand, done, units, peers) -> bool:
  """Applies naked and hidden singles in place until a fixpoint; False on contradiction.

  ``done[c]`` marks singles already removed from their peers (each is removed
  once).
  """
  changed = True
  while changed:
    changed = False
    for c in range(81):
      v = cand[c]
      if v == 0:
        return False
      if done[c] == 0 and v & (v - 1) == 0:  # A new single: remove it from the peers.
        done[c] = 1
        changed = True
        for k in range(20):
          p = peers[c, k]
          if cand[p] & v:
            cand[p] &= ~v
            if cand[p] == 0:
              return False
    for u in range(27):
      once = 0
      twice = 0
      for k in range(9):
        m = cand[units[u, k]]
        twice |= once & m
        once |= m
      if once != 0x3FE:
        return False
      unique = once & ~twice
      if unique:
        for k in range(9):
          c = units[u, k]
          m = cand[c] & unique
          if m and cand[c] != m:
            if m & (m - 1):  # Two digits that both must go here.
              return False
            cand[c] = m
            changed = True
  return True


@numba.njit(cache=True, nogil=True)
def _solve_one(board, limit, digit_order, units, peers, solution_out):
  """Counts solutions of ``board`` up to ``limit``; writes the first to ``solution_out``.

  Returns ``(num_solutions, guesses_to_first_solution, total_guesses)``.
  """
  cand = np.empty(81, np.uint16)
  done = np.zeros(81, np.uint8)
  for c in range(81):
    d = board[c]
    cand[c] = (1 << d) if d else 0x3FE
  num_solutions = 0
  guesses = 0
  guesses_first = 0
  if not _propagate(cand, done, units, peers):
    return 0, 0, 0
  # Explicit DFS stack: the state before branching, the branch cell and the
  # candidates of that cell not tried yet.
  saved = np.empty((82, 81), np.uint16)
  saved_done = np.empty((82, 81), np.uint8)
  branch_cell = np.empty(82, np.int32)
  remaining = np.empty(82, np.uint16)
  depth = 0
  need_branch = True
  while True:
    if need_branch:
      best = -1
      best_n = 10
      for c in range(81):
        n = _popcount(cand[c])
        if 1 < n < best_n:
          best_n = n
          best = c
          if n == 2:
            break
      if best < 0:  # Every cell has one candidate: a solution.
        num_solutions += 1
        if num_solutions == 1:
          guesses_first = guesses
          for c in range(81):
            v = cand[c]
            d = 0
            while v > 1:
              v >>= 1
              d += 1
            solution_out[c] = d
        if num_solutions >= limit:
          break
      else:
        saved[depth, :] = cand
        saved_done[depth, :] = done
        branch_cell[depth] = best
        remaining[depth] = cand[best]
        depth += 1
    # Try the next candidate of the innermost branch that still has one.
    need_branch = False
    while depth > 0 and not need_branch:
      lvl = depth - 1
      rem = remaining[lvl]
      if rem == 0:
        depth -= 1
        continue
      cell = branch_cell[lvl]
      bit = 0
      for k in range(9):
        b = 1 << digit_order[cell, k]
        if rem & b:
          bit = b
          break
      remaining[lvl] = rem & ~bit
      cand[:] = saved[lvl, :]
      done[:] = saved_done[lvl, :]
      cand[cell] = bit
      guesses += 1
      if _propagate(cand, done, units, peers):
        need_branch = True
    if depth == 0 and not need_branch:
      break
  return num_solutions, guesses_first, guesses


@numba.njit(cache=True, nogil=True)
def _solve_batch(boards, limit, units, peers, order, solutions, num_solutions, guesses,
                 total_guesses):
  for i in range(boards.shape[0]):
    n, g, t = _solve_one(boards[i], limit, order, units, peers, solutions[i])
    num_solutions[i] = n
    guesses[i] = g
    total_guesses[i] = t


def _num_threads() -> int:
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not on Linux
    return max(1, os.cpu_count() or 1)


def solve_batch(boards_Nx81: np.ndarray, limit: int = 2, num_threads: int | None = None):
  """Solves many boards, in chunks on ``num_threads`` threads (default: the usable cores).

  The kernel releases the GIL; each board is solved independently, so the
  result does not depend on the thread count.

  Args:
    boards_Nx81: ``[N, 81]`` digits, 0 for a blank.
    limit: stop counting solutions at this many (2 decides uniqueness).
    num_threads: worker threads; 1 solves in the calling thread.

  Returns:
    ``(solutions [N,81] uint8, num_solutions [N] int32, rating [N] int32,
    total_guesses [N] int32)``: the first solution found (zeros when there is
    none), ``min(#solutions, limit)``, the guesses to the first solution (the
    difficulty rating, see the module docstring) and the guesses of the whole
    search (which for a unique puzzle includes proving uniqueness).
  """
  boards = np.ascontiguousarray(boards_Nx81, dtype=np.uint8).reshape(-1, 81)
  if boards.size and boards.max() > 9:
    raise ValueError("sudoku boards hold digits 0..9")
  n = boards.shape[0]
  solutions = np.zeros((n, 81), np.uint8)
  num_solutions = np.zeros(n, np.int32)
  rating = np.zeros(n, np.int32)
  total = np.zeros(n, np.int32)

  def run(lo, hi):
    _solve_batch(boards[lo:hi], int(limit), UNITS_27x9, PEERS_81x20, _NATURAL_ORDER_81x9,
                 solutions[lo:hi], num_solutions[lo:hi], rating[lo:hi], total[lo:hi])

  threads = min(num_threads or _num_threads(), max(1, n // 64))
  if threads <= 1:
    if n:
      run(0, n)
  else:
    # Small chunks balance the load (hard puzzles cluster in lists).
    chunk = max(16, min(1024, n // (8 * threads)))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for f in [pool.submit(run, lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]:
        f.result()
  return solutions, num_solutions, rating, total


@numba.njit(cache=True, nogil=True)
def _generate_one(digit_order, removal_order, target_clues, units, peers, natural_order,
                  puzzle_out, solution_out):
  """A random full grid, then clues removed in ``removal_order`` while unique."""
  empty = np.zeros(81, np.uint8)
  n, _, _ = _solve_one(empty, 1, digit_order, units, peers, solution_out)
  if n != 1:
    return -1
  puzzle_out[:] = solution_out
  clues = 81
  scratch = np.empty(81, np.uint8)
  for k in range(81):
    if clues <= target_clues:
      break
    c = removal_order[k]
    saved = puzzle_out[c]
    puzzle_out[c] = 0
    count, _, _ = _solve_one(puzzle_out, 2, natural_order, units, peers, scratch)
    if count == 1:
      clues -= 1
    else:
      puzzle_out[c] = saved
  return clues


@numba.njit(cache=True, nogil=True)
def _generate_batch(digit_orders, removal_orders, target_clues, units, peers, natural_order,
                    puzzles, solutions, clues):
  for i in range(digit_orders.shape[0]):
    clues[i] = _generate_one(digit_orders[i], removal_orders[i], target_clues, units, peers,
                             natural_order, puzzles[i], solutions[i])


def generate_batch(rng: np.random.Generator, n: int, target_clues: int = 0):
  """Generates ``n`` puzzles with a unique solution.

  A full grid is drawn by solving the empty board with random per-cell digit
  orders; then cells are visited in a random order and each clue is removed if
  the puzzle keeps a unique solution, until ``target_clues`` remain or every
  cell has been tried (``target_clues=0``: a minimal puzzle, typically 22-27
  clues). All randomness comes from ``rng`` (drawn here, in numpy), so the
  result depends only on the generator state.

  Returns ``(puzzles [n,81] uint8, solutions [n,81] uint8, clues [n] int32)``.
  """
  digit_orders = np.argsort(rng.random((n, 81, 9)), axis=-1).astype(np.int8) + 1
  removal_orders = np.argsort(rng.random((n, 81)), axis=-1).astype(np.int32)
  puzzles = np.zeros((n, 81), np.uint8)
  solutions = np.zeros((n, 81), np.uint8)
  clues = np.zeros(n, np.int32)
  if n:
    _generate_batch(digit_orders, removal_orders, int(target_clues), UNITS_27x9, PEERS_81x20,
                    _NATURAL_ORDER_81x9, puzzles, solutions, clues)
  if (clues < 0).any():  # The empty board always has a solution; this is a bug guard.
    raise RuntimeError("sudoku generator failed to fill a grid")
  return puzzles, solutions, clues


def is_valid_solution(solutions_Nx81: np.ndarray) -> np.ndarray:
  """True where a board is a complete valid Sudoku grid (every unit holds 1..9)."""
  s = np.asarray(solutions_Nx81).reshape(-1, 81).astype(np.int64)
  # One bit per digit; a unit is valid when its bits OR to 1..9 and nothing is 0.
  bits = np.where(s > 0, 1 << s, 0)
  unit_or = np.bitwise_or.reduce(bits[:, UNITS_27x9], axis=-1)
  return (unit_or == 0x3FE).all(axis=-1) & (s > 0).all(axis=-1)


def consistent_with_givens(puzzles_Nx81: np.ndarray, solutions_Nx81: np.ndarray) -> np.ndarray:
  """True where every given digit of the puzzle equals the solution's."""
  p = np.asarray(puzzles_Nx81).reshape(-1, 81)
  s = np.asarray(solutions_Nx81).reshape(-1, 81)
  return ((p == 0) | (p == s)).all(axis=-1)
