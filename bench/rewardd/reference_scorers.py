#!/usr/bin/env python3
"""Reference figures for bench/rewardd/reward_bench.cc, run in the same process tree.

- TinyZero's countdown scorer (verl/utils/reward_score/countdown.py: regex extraction, number
  check, character whitelist, then Python eval), the usual Python implementation of this reward.
- A sympy equivalence check (simplify(gold - pred) == 0 on sympify'd text), the usual core of
  Python math verifiers, on plain-text versions of the benchmark's math pairs.
"""
import re
import sys
import time

seconds = float(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else 2.0


def extract_solution(solution_str):
    matches = list(re.finditer(r"<answer>(.*?)</answer>", solution_str))
    return matches[-1].group(1).strip() if matches else None


def validate_equation(equation_str, available_numbers):
    try:
        numbers_in_eq = [int(n) for n in re.findall(r"\d+", equation_str)]
        return sorted(numbers_in_eq) == sorted(available_numbers)
    except Exception:
        return False


def evaluate_equation(equation_str):
    try:
        if not re.match(r"^[\d+\-*/().\s]+$", equation_str):
            raise ValueError("Invalid characters in equation.")
        return eval(equation_str, {"__builtins__": None}, {})
    except Exception:
        return None


def countdown_score(solution_str, numbers, target, format_score=0.1, score=1.0):
    equation = extract_solution(solution_str)
    if equation is None:
        return 0
    if not validate_equation(equation, numbers):
        return format_score
    result = evaluate_equation(equation)
    if result is None:
        return format_score
    return score if abs(result - target) < 1e-5 else format_score


def rate(fn):
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(16):
            fn(n)
            n += 1
    return n / (time.perf_counter() - t0)


cases = [("<think>try</think> <answer>(67 - 53) * (85 - 30)</answer>", [53, 67, 30, 85], 770),
         ("<think>try</think> <answer>(93 + 46) - 84</answer>", [46, 84, 93], 55)]
print("  %-42s %14.0f" % ("countdown, TinyZero scorer (Python)",
                          rate(lambda i: countdown_score(*cases[i % 2]))))
try:
    import sympy
    pairs = [("42", "42"), ("1/2", "0.5"), ("2*sqrt(3)", "sqrt(12)"), ("x**2-1", "(x-1)*(x+1)"),
             ("1000", "1000"), ("pi", "3.14159265"), ("7", "8"), ("3/4", "4/3"), ("2**10", "1024"),
             ("n*(n+1)/2", "(n**2+n)/2")]

    def check(i):
        g, p = pairs[i % len(pairs)]
        try:
            return sympy.simplify(sympy.sympify(g) - sympy.sympify(p)) == 0
        except Exception:
            return False

    print("  %-42s %14.0f" % ("math, sympy simplify(gold - pred) == 0", rate(check)))
except ImportError:
    print("  (sympy not installed: no math reference)")
