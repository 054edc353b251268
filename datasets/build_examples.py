"""Writes the example manifests in datasets/examples/ (run: python datasets/build_examples.py).

smoke.parquet: a handful of prompts with per-row overrides (used by `make demo`).
ucf101.parquet: the 101 UCF-101 action classes as prompts, "A realistic video of a person: <class words>." (the
UCF-101 FVD protocol generates videos from class names).
"""
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")

UCF101 = """ApplyEyeMakeup ApplyLipstick Archery BabyCrawling BalanceBeam BandMarching BaseballPitch Basketball
BasketballDunk BenchPress Biking Billiards BlowDryHair BlowingCandles BodyWeightSquats Bowling BoxingPunchingBag
BoxingSpeedBag BreastStroke BrushingTeeth CleanAndJerk CliffDiving CricketBowling CricketShot CuttingInKitchen Diving
Drumming Fencing FieldHockeyPenalty FloorGymnastics FrisbeeCatch FrontCrawl GolfSwing Haircut Hammering HammerThrow
HandstandPushups HandstandWalking HeadMassage HighJump HorseRace HorseRiding HulaHoop IceDancing JavelinThrow
JugglingBalls JumpingJack JumpRope Kayaking Knitting LongJump Lunges MilitaryParade Mixing MoppingFloor Nunchucks
ParallelBars PizzaTossing PlayingCello PlayingDaf PlayingDhol PlayingFlute PlayingGuitar PlayingPiano PlayingSitar
PlayingTabla PlayingViolin PoleVault PommelHorse PullUps Punch PushUps Rafting RockClimbingIndoor RopeClimbing Rowing
SalsaSpin ShavingBeard Shotput SkateBoarding Skiing Skijet SkyDiving SoccerJuggling SoccerPenalty StillRings
SumoWrestling Surfing Swing TableTennisShot TaiChi TennisSwing ThrowDiscus TrampolineJumping Typing UnevenBars
VolleyballSpiking WalkingWithDog WallPushups WritingOnBoard YoYo""".split()


def words(name: str) -> str:
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower()


def main() -> None:
    assert len(UCF101) == 101, len(UCF101)
    os.makedirs(HERE, exist_ok=True)
    smoke = pa.table({
        "id": ["horses", "kite", "snow", "city-timelapse", "lantern"],
        "prompt": ["Two horses race across a grassy field at sunset.", "A red kite dances over a windy beach.",
                   "Snow falling on a quiet street at night, warm lamplight.",
                   "Time-lapse of clouds over a city skyline.",
                   "A paper lantern drifting upward into a starry sky."],
        "sampler": ["ivmixed", "standard", "ivmixed", "ivmixed_ad_v1", None],
        "seed": pa.array([23523, 7, None, 11, 3], pa.int64()),
        "guidance": pa.array([None, 6.0, None, None, 9.0], pa.float64()),
        "idm_guidance": [None, None, "6,2,7", None, None],
        "interval": [None, None, "0.0..0.5", None, None],
        "category": ["animal", "scenery", "scenery", "scenery", "object"],
    })
    pq.write_table(smoke, os.path.join(HERE, "smoke.parquet"))
    ucf = pa.table({
        "id": [f"ucf101-{i:03d}-{n.lower()}" for i, n in enumerate(UCF101)],
        "prompt": [f"A realistic video of a person: {words(n)}." for n in UCF101],
        "category": UCF101,
    })
    pq.write_table(ucf, os.path.join(HERE, "ucf101.parquet"))


if __name__ == "__main__":
    main()
