"""``hf-capgap law``: fit the law of capacity gap from a sweep ledger, ask it for a teacher, or plan the
teacher assistants between a teacher too big and its student.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("law", help="fit the law of capacity gap or pick a teacher with it")
    actions = parser.add_subparsers(dest="law_command", required=True)

    fit = actions.add_parser("fit", help="fit t* = k s from a sweep ledger (JSON lines)")
    fit.add_argument("ledger", help="JSON-lines file of student_params, teacher_params, eval_loss records")
    fit.add_argument("--out", required=True, help="where to write the fitted law (JSON)")
    fit.add_argument(
        "--plot", help="also write a PNG of the loss curves and the fitted line (curves only if the fit fails)"
    )
    fit.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap draws for the interval of k")
    fit.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    fit.add_argument("--affine", action="store_true", help="predict with t* = k s + b instead of the paper's t* = k s")
    fit.set_defaults(handler=_fit)

    suggest = actions.add_parser("suggest", help="the best teacher size for a student size")
    suggest.add_argument("--student", required=True, help="student size, e.g. 3e9, 3B, 350M, 70m")
    suggest.add_argument("--teachers", help="comma-separated sizes you can use as teacher, e.g. 1B,3B,7B,13B")
    suggest.add_argument("--law", help="law JSON from `hf-capgap law fit` (default: the published law, k = 2.5)")
    suggest.set_defaults(handler=_suggest)

    chain = actions.add_parser("chain", help="teacher-assistant sizes between a teacher too big and its student")
    chain.add_argument("--student", required=True, help="student size, e.g. 1B")
    chain.add_argument("--teacher", required=True, help="teacher size, e.g. 70B")
    chain.add_argument("--law", help="law JSON from `hf-capgap law fit` (default: the published law, k = 2.5)")
    chain.set_defaults(handler=_chain)


def _fit(args: argparse.Namespace) -> int:
    from hf_capgap.law import CapacityGapLaw, TooFewOptimaError, plot_measurements

    try:
        law = CapacityGapLaw.fit(
            args.ledger, n_bootstrap=args.n_bootstrap, seed=args.seed, through_origin=not args.affine
        )
    except TooFewOptimaError as error:
        if not args.plot:
            raise
        plot_measurements(args.ledger, args.plot)
        raise TooFewOptimaError(f"{error} No law written; the measured curves are in {args.plot}.") from error
    law.save(args.out)
    if args.plot:
        law.plot(args.plot)
    print(law.summary())
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _suggest(args: argparse.Namespace) -> int:
    from hf_capgap.law import CapacityGapLaw, format_params, parse_params

    law = CapacityGapLaw.load(args.law) if args.law else CapacityGapLaw.paper()
    student = parse_params(args.student)
    if args.teachers:
        teachers = [parse_params(size) for size in args.teachers.split(",") if size.strip()]
        print(law.suggest(student, teachers).reason)
        return 0
    prediction = law.predict(student)
    line = f"best teacher for a {format_params(student)} student: {format_params(prediction.params)}"
    if prediction.lo is not None:
        line += f" (interval {format_params(prediction.lo)}-{format_params(prediction.hi)})"
    print(f"{line}, by the {law.source} law {law.formula()}")
    return 0


def _chain(args: argparse.Namespace) -> int:
    from hf_capgap.law import CapacityGapLaw

    law = CapacityGapLaw.load(args.law) if args.law else CapacityGapLaw.paper()
    print(law.chain(args.student, args.teacher).summary())
    return 0
