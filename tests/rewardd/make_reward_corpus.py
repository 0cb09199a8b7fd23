#!/usr/bin/env python3
# Writes reward_corpus.jsonl: the table-driven reward corpus read by rewards_test.cc. Each line is
# one case: fn (math|math_dapo|countdown|arith|format|format_graded|language|overlong|length|
# repetition), its inputs, and the expected score. Edit the tables here and rerun.
import json, os
cases = []
def T(a): return "<think>reasoning</think> <answer>%s</answer>" % a
def B(a): return "So the final answer is $\\boxed{%s}$." % a
def math(gold, pred, exp, wrap=T):
    cases.append({"fn": "math", "gold": gold, "completion": wrap(pred), "expect": exp})
# --- math: equal ---
eq = [
 ("42","42"),("42"," 42 "),("42","42."),("42","$42$"),("42","\\(42\\)"),("-7","-7"),("-7","- 7"),
 ("0.5","\\frac{1}{2}"),("0.5","\\dfrac{1}{2}"),("0.5","\\tfrac12"),("\\frac{1}{2}","0.5"),("\\frac12","1/2"),
 ("\\frac{3}{4}","0.75"),("\\frac{3}{4}","\\frac{6}{8}"),("\\frac{-3}{4}","-\\frac{3}{4}"),("1/3","\\frac{1}{3}"),
 ("1000","1,000"),("1000000","1,000,000"),("1234567","1{,}234{,}567"),("1234","1\\,234"),("12345.5","12,345.5"),
 ("5","5\\text{ cm}"),("5","5 cm"),("12","12 \\text{square units}"),("30","30^\\circ"),("30","30^{\\circ}"),("30","30°"),
 ("18","\\$18"),("18","18 dollars"),("18","\\text{18}"),("7","x = 7"),("7","x=7"),("-2","y = -2"),("3","\\theta = 3"),
 ("3","a = b = 3"),("2","\\left(2\\right)"),("\\sqrt{2}","\\sqrt2"),("\\sqrt{2}","2^{1/2}"),("\\sqrt{2}","1.41421356"),
 ("2\\sqrt{3}","\\sqrt{12}"),("2\\sqrt{3}","2 \\sqrt{3}"),("\\frac{\\sqrt{3}}{2}","\\frac{1}{2}\\sqrt{3}"),
 ("\\sqrt[3]{8}","2"),("\\pi","3.14159265"),("2\\pi","2 \\pi"),("\\frac{\\pi}{2}","\\pi/2"),("\\frac{\\pi}{4}","0.25\\pi"),
 ("2^{10}","1024"),("1024","2^10"),("8","2^3"),("10^{6}","1000000"),("1.5\\times10^{3}","1500"),("1500","1.5e3"),
 ("0.001","1e-3"),("3.2 \\times 10^{-2}","0.032"),("50\\%","50"),("50","50\\%"),("0.5","50\\%"),("25\\%","0.25"),
 ("12.5\\%","12.5%"),("3.0","3"),("3","3.000"),("0.1","0.10"),(".5","0.5"),("100","100.0"),("6","3!"),("120","5!"),
 ("x+1","1+x"),("2x+3","3+2x"),("x^2-1","(x-1)(x+1)"),("x^2+2x+1","(x+1)^2"),("\\frac{x}{2}","0.5x"),("2a+2b","2(a+b)"),
 ("y = 2x + 1","2x+1"),("n(n+1)/2","\\frac{n^2+n}{2}"),("\\frac{1}{x}","x^{-1}"),("\\sqrt{x}","x^{1/2}"),("3x","x \\cdot 3"),
 ("ab","ba"),("2\\cdot 3","6"),("2\\times 3","6"),("6","2*3"),("\\frac{10}{4}","2.5"),("2\\frac{1}{2}","2.5"),("2\\frac{1}{2}","\\frac{5}{2}"),
 ("(1,2)","(1, 2)"),("(1,2)","\\left(1, 2\\right)"),("(\\frac{1}{2}, 3)","(0.5, 3)"),("(1,2,3)","(1,2,3)"),
 ("\\{1,2\\}","\\{2,1\\}"),("\\{1,2,3\\}","\\{3, 2, 1\\}"),("1,2","2,1"),("1, 2, 3","3, 1, 2"),("2, -2","-2, 2"),("\\pm 2","2, -2"),
 ("1\\pm\\sqrt{2}","1+\\sqrt{2}, 1-\\sqrt{2}"),("x=1, x=2","1, 2"),
 ("[1,2]","[1, 2]"),("(0,\\infty)","(0, \\infty)"),("(-\\infty, 3]","(-\\infty,3]"),("[2,5)","[2, 5)"),
 ("(-\\infty,0)\\cup(1,\\infty)","(1,\\infty)\\cup(-\\infty,0)"),("[0, \\frac{1}{2}]","[0, 0.5]"),
 ("\\text{Yes}","yes"),("Yes","YES"),("(B)","B"),("B","(B)"),("\\text{(C)}","C"),("\\textbf{A}","A"),
 ("0.33","\\frac{1}{3}"),("3.14","\\pi"),("1.41","\\sqrt{2}"),("0.67","\\frac23"),
 ("\\frac{1}{\\sqrt{2}}","\\frac{\\sqrt{2}}{2}"),("\\log_2 8","3"),("\\ln(e)","\\ln(e)"),("\\sin(\\pi/6)","0.5"),
 ("\\cos 0","1"),("e^{2}","e^2"),("|{-3}|","3"),("-0","0"),("\\infty","\\infty"),("-\\infty","-\\infty"),
 ("5","\\boxed{5}"),("10","10 \\text{ meters}"),("4","4 \\text{ inches}"),("15","\\mbox{15}"),("\\dfrac{7}{2}","3.5"),
 ("3\\sqrt{2}","\\sqrt{18}"),("\\frac{5\\sqrt{2}}{2}","\\frac{5}{\\sqrt{2}}"),("10\\%","0.1"),("1.2\\cdot10^{5}","120,000"),
 ("x^2","x*x"),("\\frac{a+b}{2}","\\frac{b+a}{2}"),("2^{-1}","0.5"),("1/8","2^{-3}"),("9","3^2"),("\\sqrt{16}","4"),
 ("\\sqrt{a^2}","a"),("(3, -1)","(3,-1)"),("\\left[1,3\\right)","[1,3)"),
]
for g,p in eq: math(g,p,1)
for g,p in [("42","42"),("\\frac{1}{2}","0.5"),("2\\sqrt{3}","\\sqrt{12}"),("(1,2)","(1,2)"),("7","x = 7"),("\\pi","\\pi"),("1000","1,000"),("50\\%","50")]:
    math(g,p,1,B)
# Boxed inside answer wins, nested braces
cases.append({"fn":"math","gold":"\\frac{1}{2}","completion":"<think>x</think><answer>The answer is \\boxed{\\frac{1}{2}}</answer>","expect":1})
cases.append({"fn":"math","gold":"\\frac{1}{2}","completion":"\\boxed{3} no wait \\boxed{\\frac{1}{2}}","expect":1})
cases.append({"fn":"math","gold":"3","completion":"\\boxed{\\frac{1}{2}} no wait \\boxed{3}","expect":1})
cases.append({"fn":"math","gold":"3","completion":"<answer>5</answer> actually <answer>3</answer>","expect":1})
cases.append({"fn":"math","gold":"\\sqrt{\\frac{1}{4}}","completion":"\\boxed{\\sqrt{\\frac{1}{4}}}","expect":1})
cases.append({"fn":"math","gold":"{1}","completion":"\\boxed{{{1}}}","expect":1})
# --- math: not equal ---
ne = [
 ("42","43"),("42","-42"),("42","4.2"),("0.5","\\frac{1}{3}"),("\\frac{3}{4}","\\frac{4}{3}"),("1000","100"),("1,000","1.000"),
 ("5","5.1"),("2\\sqrt{3}","3\\sqrt{2}"),("\\pi","3"),("\\pi","3.14"),("2^{10}","20"),("1500","1.5e4"),("50\\%","5"),
 ("x+1","x-1"),("x^2-1","(x-1)^2"),("2x","x^2"),("n(n+1)/2","n^2/2"),("\\frac{1}{x}","x"),("ab","a+b"),
 ("(1,2)","(2,1)"),("(1,2)","[1,2]"),("(1,2)","(1,2,3)"),("[1,2]","[1,2)"),("(0,\\infty)","[0,\\infty)"),("\\{1,2\\}","\\{1,3\\}"),
 ("1,2","1,2,3"),("1,2","1"),("2, -2","2"),("(-\\infty,0)\\cup(1,\\infty)","(-\\infty,0)\\cup[1,\\infty)"),
 ("Yes","No"),("(B)","C"),("A","B"),("0.25","0.254"),("0.5","0.54"),("0.33","0.3"),("1.41","1.4"),
 ("\\infty","-\\infty"),("7","x = 8"),("3","a = b = 4"),("10","100\\%"),("6","3"),("24","4!+1"),("\\sqrt{2}","2"),
 ("e^2","e^3"),("1/8","2^{3}"),("x^2","2x"),("3x","3+x"),("-1","1"),("0","1"),("12","12a"),("12","twelve"),
 ("7","7,8"),("(3, -1)","(-1, 3)"),("2","\\sqrt{2}"),("\\frac{\\pi}{2}","\\pi"),("100","1e3"),("0.001","0.01"),
]
for g,p in ne: math(g,p,0)
# no answer / weird
cases.append({"fn":"math","gold":"5","completion":"I think it is 5","expect":0})
cases.append({"fn":"math","gold":"5","completion":"<answer></answer>","expect":0})
cases.append({"fn":"math","gold":"5","completion":"\\boxed{5","expect":0})
cases.append({"fn":"math","gold":"5","completion":"<answer>5","expect":0})
cases.append({"fn":"math","gold":"5","completion":"","expect":0})
cases.append({"fn":"math","gold":"5","completion":"\\boxed{}","expect":0})
cases.append({"fn":"math","gold":"5","completion":"<answer>\\frac{5}{0}</answer>","expect":0})
cases.append({"fn":"math","gold":"5","completion":"<answer>(((((5</answer>","expect":0})
cases.append({"fn":"math","gold":"5","completion":"<answer>5}}}}</answer>","expect":0})
cases.append({"fn":"math","gold":"5","completion":"<answer>\u00ff\u00fe\u0000</answer>","expect":0})
# DAPO +-1
cases.append({"fn":"math_dapo","gold":"5","completion":T("5"),"expect":1})
cases.append({"fn":"math_dapo","gold":"5","completion":T("6"),"expect":-1})
cases.append({"fn":"math_dapo","gold":"5","completion":"none","expect":-1})
# --- countdown ---
def CD(nums, target, expr, exp, raw=None):
    cases.append({"fn":"countdown","numbers":nums,"target":target,"completion": raw if raw is not None else "<think>t</think>\n<answer>%s</answer>" % expr,"expect":exp})
CD([1,2,3],6,"1+2+3",1); CD([1,2,3],6,"(1 + 2) * 3 - 3",0.1); CD([1,2,3],9,"(1 + 2) * 3",1); CD([3,7,25],46,"25 + 7*3",1)
CD([3,7,25],46,"(25 + 7) * 3",0.1); CD([19,36,55,7],65,"55 + 36 - 7 - 19",1); CD([19,36,55,7],65,"55+36-19-7",1)
CD([4,4,4],3,"(4+4+4)/4",0.1); CD([4,4,4],2,"(4+4)/4",1); CD([4,4,4],12,"4+4+4",1); CD([4,4,4],64,"4*4*4",1)
CD([4,4,4],1,"4/4*4",0.1); CD([2,3],1.0 and 1,"3-2",1); CD([2,3],-1,"2-3",1); CD([6,3],2,"6/3",1); CD([6,4],1,"6/4",0.1)
CD([1,3,4,6],24,"6/(1-3/4)",1); CD([3,3,8,8],24,"8/(3-8/3)",1); CD([3,3,8,8],24,"8/(3-(8/3))",1); CD([1,1],0,"1-1",1)
CD([5,5],1,"5/(5-5)",0.1); CD([5,5,5],0,"5/(5-5)*5",0.1); CD([1,2,3],6,"1 \\times 2 \\times 3",1); CD([1,2,3],6,"1 × 2 × 3",1)
CD([8,2],4,"8 ÷ 2",1); CD([1,2,3],6,"1+2+3 = 6",1); CD([1,2,3],6,"$1+2+3$",1); CD([1,2,3],6,"-1+2+5",0)
CD([1,2,3],6,"1+2+3+",0); CD([1,2,3],6,"(1+2+3",0); CD([1,2,3],6,"1+2+3)",0); CD([1,2,3],6,"1.0+2+3",0)
CD([1,2,3],6,"import os",0); CD([1,2,3],6,"__import__('os').system('ls')",0); CD([1,2,3],6,"1 2 3",0); CD([1,2,3],6,"1**2+3",0)
CD([1,2,3],6,"",0); CD([1,2,3],6,None,0,"no tags at all 1+2+3"); CD([1,2,3],6,"1+2",0.1); CD([1,2,3],6,"1+2+3+3",0.1)
CD([10,20],30,"10+20",1); CD([10,20],200,"10*20",1); CD([10,20],2,"20/10",1); CD([10,20],2,"(20)/(10)",1)
CD([10,20],30,"((((10))))+20",1); CD([99,1,3],33,"(99*1)/3",1); CD([99,1,3],33,"99/3/1",1); CD([2,2],4,"2^2",0)
CD([7,8,9],15,"7+8",0.1); CD([100,3],103,"100+3",1); CD([100,3],97,"100 - 3",1); CD([1,2,3],6,"1+2+3",1,"\\boxed{1+2+3}")
CD([1,2,3],6,None,1,"<answer>wrong</answer> then <answer>1+2+3</answer>")
CD([1,2,3],7,"1+2*3",1); CD([1,2,3],9,"1+2*3",0.1); CD([1,2,3],5,"1*2+3",1); CD([50,25,2],4,"50/25*2",1)
CD([50,25,2],1,"50/(25*2)",1)
# --- arith ---
def AR(gold, pred, exp, raw=None):
    cases.append({"fn":"arith","gold":gold,"completion": raw if raw is not None else T(pred),"expect":exp})
AR("1793412","1793412",1); AR("1793412","1,793,412",1); AR("1793412","1793412.",1); AR("1793412"," 1793412 ",1)
AR("1793412","1793413",0); AR("1793412","1793412.0",0); AR("1793412","1.793412e6",0); AR("-55","-55",1); AR("-55","55",0)
AR("0","0",1); AR("0","-0",1); AR("7","007",1); AR("123456789012345678901","123456789012345678901",1)
AR("123456789012345678901","123456789012345678900",0); AR("12","twelve",0); AR("12","12 apples",0); AR("12","",0)
AR("12",None,1,"\\boxed{12}"); AR("12",None,0,"the answer is 12"); AR("12","+12",1); AR("12","$12$",1); AR("12","1 2",1)
AR("100","10 0",1); AR("5","5/1",0); AR("5","x=5",0); AR("99999999","99999999",1); AR("99999999","99,999,999",1)
AR("42",None,1,"<answer>41</answer><answer>42</answer>"); AR("42",None,0,"<answer>42"); AR("-1","- 1",1)
# --- format ---
def F(c, strict, graded, pre=False):
    cases.append({"fn":"format","completion":c,"expect":strict,"prefilled":pre})
    cases.append({"fn":"format_graded","completion":c,"expect":graded,"prefilled":pre})
F("<think>a</think><answer>b</answer>",1,1); F("<think>\nlong\n</think>\n<answer>\n5\n</answer>\n",1,1)
F(" <think>a</think> <answer>b</answer> ",1,1); F("<answer>b</answer><think>a</think>",0,0.5); F("<think>a</think>",0,0.5)
F("<answer>b</answer>",0,0.5); F("",0,0); F("no tags",0,0); F("<think>a</think><think>b</think><answer>c</answer>",0,0.5)
F("<think>a</think><answer>b</answer><answer>c</answer>",0,0.5); F("<think>a</think> text <answer>b</answer>",0,1)
F("<think>a</think><answer>b</answer> trailing",0,1); F("preamble<think>a</think><answer>b</answer>",0,1)
F("<think>a<answer>b</answer></think>",0,0.5); F("</think><think><answer>b</answer>",0,0.75)
F("a</think><answer>b</answer>",1,1,True); F("a</think><answer>b</answer>",0,0.75,False); F("<think>a</think><answer>b</answer>",0,0.75,True)
F("<think></think><answer></answer>",1,1); F("<THINK>a</THINK><ANSWER>b</ANSWER>",0,0)
# --- language ---
def L(c, script, exp):
    cases.append({"fn":"language","completion":c,"script":script,"expect":exp})
L("<think>the cat sat on the mat</think><answer>1</answer>","latin",1); L("<think>这是一个测试</think><answer>1</answer>","latin",0)
L("<think>这是一个测试</think>","cjk",1); L("<think>the 猫 sat</think>","latin",2/3); L("<think>the 猫猫 sat</think>","latin",0.5)
L("<think>123 + 456 = 579</think>","latin",0); L("<think>Привет мир hello</think>","latin",1/3); L("<think>Привет мир</think>","cyrillic",1)
L("<think>café naïve résumé</think>","latin",1); L("no tags just words here<answer>x</answer>","latin",1); L("<think></think>","latin",0)
L("<think>x = y + z, so x - y = z.</think>","latin",1); L("<think>مرحبا world</think>","arabic",0.5); L("<think>let 数 be 5</think>","cjk",1/3)
L("<think>\u00ff\u00fe junk</think>","latin",1)
# --- overlong / length / repetition ---
for tok, exp in [(100,0),(3584,0),(3585,-1/512),(3840,-0.5),(4096,-1),(4097,-1),(10000,-1)]:
    cases.append({"fn":"overlong","tokens":tok,"max":4096,"cache":512,"expect":exp})
for tok, exp in [(100,0),(1024,0),(2560,-0.5),(4096,-1),(9999,-1)]:
    cases.append({"fn":"length","tokens":tok,"target":1024,"max":4096,"expect":exp})
cases.append({"fn":"repetition","completion":"a b c d e f","expect":0})
cases.append({"fn":"repetition","completion":"a b c a b c","expect":-0.25})
cases.append({"fn":"repetition","completion":"x x x x x x x x x x x x","expect":-0.9})
cases.append({"fn":"repetition","completion":"a b","expect":0})
cases.append({"fn":"repetition","completion":"","expect":0})
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "reward_corpus.jsonl"), "w") as f:
    for c in cases: f.write(json.dumps(c, ensure_ascii=False)+"\n")
from collections import Counter
print(len(cases), Counter(c["fn"] for c in cases))
