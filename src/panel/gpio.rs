//! The LED and the button on a Raspberry Pi's GPIO pins, through rppal.
//!
//! rppal 0.22 identifies the Pi model from `/proc/cpuinfo` and opens
//! `/dev/gpiomem` (Pi 3 and 4) or `/dev/gpiomem0` (Pi 5), plus the pin
//! controller's `/dev/gpiochip*` for the button interrupt. Off a Pi, [`open`]
//! fails.

use rppal::gpio::{Gpio, InputPin, OutputPin, Trigger};
use tokio::time::Instant;

use crate::panel::ButtonHandle;
use crate::panel::led::Led;

/// Errors of opening the GPIO pins.
#[derive(Debug, thiserror::Error)]
pub enum GpioError {
    #[error(
        "cannot open the GPIO device: {0}; on a Pi 3 or 4 pass --device /dev/gpiomem, on a Pi 5 --device /dev/gpiomem0, or set panel.backend = \"simulated\""
    )]
    Open(rppal::gpio::Error),
    #[error("cannot use GPIO {pin} for the {role}: {source}; check panel.{role}_pin")]
    Pin { pin: u8, role: &'static str, source: rppal::gpio::Error },
}

/// The LED on an output pin: high is on.
pub struct GpioLed {
    pin: OutputPin,
}

impl Led for GpioLed {
    fn set(&mut self, on: bool) {
        if on {
            self.pin.set_high();
        } else {
            self.pin.set_low();
        }
    }
}

/// The button input. Dropping it stops the interrupt.
pub struct GpioButton {
    _pin: InputPin,
    /// Whether the button was pressed when the pin was opened.
    pub pressed_at_start: bool,
}

/// Opens the LED and the button pins and sends every button edge to
/// `button`. The button closes to ground, so a low level is a press.
pub fn open(led_pin: u8, button_pin: u8, button: ButtonHandle) -> Result<(GpioLed, GpioButton), GpioError> {
    let gpio = Gpio::new().map_err(GpioError::Open)?;
    let led = gpio.get(led_pin).map_err(|source| GpioError::Pin { pin: led_pin, role: "led", source })?.into_output_low();
    let mut input = gpio.get(button_pin).map_err(|source| GpioError::Pin { pin: button_pin, role: "button", source })?.into_input_pullup();
    let pressed_at_start = input.is_low();

    // Debouncing happens in `Button`, so the interrupt passes every edge on.
    input
        .set_async_interrupt(Trigger::Both, None, move |event| {
            let pressed = event.trigger == Trigger::FallingEdge;
            button.send(pressed, Instant::now());
        })
        .map_err(|source| GpioError::Pin { pin: button_pin, role: "button", source })?;
    Ok((GpioLed { pin: led }, GpioButton { _pin: input, pressed_at_start }))
}
